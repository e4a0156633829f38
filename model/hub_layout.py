"""An exported folder's weights in the layout its family's released checkpoints use on the hub.

transformers 5.x renames a checkpoint's keys as it loads them (its conversion mapping) and writes
most of them back in the hub's layout when it saves (`language_model.model.*`,
`multi_modal_projector.*`), but not a CLIP or SigLIP tower nested in a llava or PaliGemma model:
that tower's wrapper module (`vision_model`) is gone in 5.x, so it saves
`vision_tower.embeddings.*`, where every llava-hf and google/paligemma checkpoint, transformers
4.x and vLLM have `vision_tower.vision_model.embeddings.*`. vLLM 0.32 refuses such a folder:
"There is no module or parameter named 'vision_tower.embeddings' in LlavaForConditionalGeneration".
transformers 5.x opens both layouts (its loader strips `vision_model.` again), so the export writes
the hub's. docs/vllm.md lists what each family needed.

    write_hub_layout("outputs/demo-hf")   # after save_pretrained; a no-op for the other families

This table is the one place that knows a family's hub layout. It lives beside, not in,
model/components.py (the module-name table of the components), whose families are edited
independently.
"""

from __future__ import annotations

import json
import os
import re

from safetensors import safe_open
from safetensors.torch import save_file

from model.components import HUB_RENAMES  # the family table: each family's hub names

INDEX = "model.safetensors.index.json"


def hub_key(key: str, renames: tuple[tuple[str, str], ...]) -> str:
    """The name `key` has in the hub's layout under `renames` (the key itself when none applies)."""
    for pattern, replacement in renames:
        key = re.sub(pattern, replacement, key)
    return key


def weight_files(folder: str) -> list[str]:
    """The safetensors files a saved model folder holds its weights in (one, or the index's shards)."""
    index = os.path.join(folder, INDEX)
    if os.path.exists(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    return ["model.safetensors"]


def rename_file(path: str, renames: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """Rewrites one safetensors file with its keys renamed (its metadata kept); {old: new} changed."""
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
        tensors = {hub_key(key, renames): f.get_tensor(key) for key in f.keys()}
        changed = {key: hub_key(key, renames) for key in f.keys() if hub_key(key, renames) != key}
    if changed:
        # Beside it, then one rename: the tensors read above may still map the old file's pages.
        save_file(tensors, path + ".tmp", metadata=metadata)
        os.replace(path + ".tmp", path)
    return changed


def write_hub_layout(folder: str) -> dict[str, str]:
    """Renames the weights of the model saved in `folder` to its family's hub layout (by the
    `model_type` of its config.json); returns {old key: new key} for every key it renamed."""
    with open(os.path.join(folder, "config.json")) as f:
        renames = HUB_RENAMES.get(json.load(f)["model_type"], ())
    if not renames:
        return {}
    changed = {}
    for name in weight_files(folder):
        changed.update(rename_file(os.path.join(folder, name), renames))
    index = os.path.join(folder, INDEX)
    if changed and os.path.exists(index):
        with open(index) as f:
            content = json.load(f)
        content["weight_map"] = {hub_key(k, renames): v for k, v in content["weight_map"].items()}
        with open(index, "w") as f:
            json.dump(content, f, indent=2)
    return changed
