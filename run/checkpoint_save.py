"""Writing a delta checkpoint: only what training changed, plus a manifest that rebuilds the rest.

A checkpoint folder (the final output and every `checkpoint-N` alike):

    vlm_manifest.json        base ids, ModelArguments, base fingerprint, tensor list, versions
    delta.safetensors        trained non-LoRA tensors (connector, unfrozen tower weights)
    llm_adapter/             PEFT's layout: adapter_config.json + adapter_model.safetensors
    vision_adapter/          (the same, when the vision tower has LoRA)
    chat_template.jinja      the template the prompts were built with

The file names are here, beside the one writer (`save_checkpoint`); run/checkpoint.py is the one
reader, and what the rest of the repo imports (it re-exports `save_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
import os

import peft
import torch
import transformers
from safetensors.torch import save_file

from errors import UserError
from model.freeze import is_lora

FORMAT_VERSION = 1
MANIFEST = "vlm_manifest.json"
DELTA = "delta.safetensors"
CHAT_TEMPLATE = "chat_template.jinja"
# Adapter folders by the model's `adapted_modules()` keys: a composed base has one per tower, a
# released VLM one for the whole model (PeftModel.from_pretrained opens it on the plain base).
ADAPTERS = {"llm": "llm_adapter", "vision": "vision_adapter", "vlm": "adapter"}
BASE_PATHS = ("vision_model", "llm_model", "vlm_model")  # ModelArguments naming base weights


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded as it is; the message says what is wrong and the fix."""


def delta_names(model) -> list[str]:
    """Non-LoRA tensors that differ from the base: trainable now, or loaded from a parent stage."""
    inherited = model.inherited_delta
    return [
        name
        for name, param in model.named_parameters()
        if not is_lora(name) and (param.requires_grad or name in inherited)
    ]


def save_checkpoint(
    model, out_dir: str, tokenizer=None, parent: str | None = None, state_dict=None, seed: int | None = None
) -> None:
    """Write the delta of `model` to `out_dir`. The manifest goes last: a folder without one
    is an unfinished save and is never loaded.

    `state_dict`: full tensors gathered by a sharded engine (ZeRO-3, FSDP), whose parameters
    are only shards; keys as in `model.named_parameters()`.
    """
    os.makedirs(out_dir, exist_ok=True)
    full = dict(model.named_parameters()) if state_dict is None else state_dict
    tensors = {name: _full_tensor(full, name) for name in delta_names(model)}
    save_file(tensors, os.path.join(out_dir, DELTA), metadata={"format": "pt"})
    for component, (prefix, module) in model.adapted_modules().items():
        adapter_state = None if state_dict is None else {
            key[len(prefix):]: _full_tensor(full, key) for key in full if key.startswith(prefix) and is_lora(key)
        }
        module.save_pretrained(os.path.join(out_dir, ADAPTERS[component]), state_dict=adapter_state)
    if tokenizer is not None and tokenizer.chat_template:
        with open(os.path.join(out_dir, CHAT_TEMPLATE), "w") as f:
            f.write(tokenizer.chat_template)
    args = dataclasses.replace(
        model.build_args, **{key: _relative_if_inside(getattr(model.build_args, key), out_dir) for key in BASE_PATHS}
    )
    parts = ("vlm",) if args.vlm_model else ("vision", "llm")
    manifest = {
        "format_version": FORMAT_VERSION,
        "base": {k: v for part in parts for k, v in ((part, getattr(args, f"{part}_model")),
                                                      (f"{part}_revision", getattr(args, f"{part}_revision")))},
        "base_fingerprint": model.base_fingerprint,
        "model_args": dataclasses.asdict(args),
        "tensors": {name: list(t.shape) for name, t in tensors.items()},
        "adapters": sorted(ADAPTERS[c] for c in model.adapted_modules()),
        "parent": parent,
        "seed": seed,  # the run's: with it, the base is rebuilt as the run's step 0 (a fresh connector)
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
    }
    tmp = os.path.join(out_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, MANIFEST))


def _full_tensor(full: dict, name: str) -> torch.Tensor:
    """A delta tensor is never empty: a ZeRO-3 shard saved as it is cannot be loaded anywhere."""
    tensor = full.get(name)
    if tensor is None or tensor.numel() == 0:
        raise CheckpointError(
            f"{name} reached the save {'missing' if tensor is None else 'as an empty ZeRO-3 shard'}: "
            "the engine did not gather it. With DeepSpeed ZeRO-3, set "
            '"stage3_gather_16bit_weights_on_model_save": true (configs/deepspeed/zero3.json does).'
        )
    return tensor.detach().cpu().contiguous()


def _relative_if_inside(path: str | None, ckpt_dir: str) -> str | None:
    """A base stored inside the checkpoint folder (an export's merged towers) is named relative
    to it, so the folder can be moved whole. Any other base (a hub id, a folder elsewhere) is
    kept as given."""
    if path is None or not os.path.isdir(path):
        return path
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(ckpt_dir))
    return path if relative.startswith("..") else relative
