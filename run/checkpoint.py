"""Delta checkpoints: only what training changed, plus a manifest that rebuilds the rest. The
folder's layout and its writer (`save_checkpoint`) are run/checkpoint_save.py, re-exported here.

One loader: `load_base` builds a base and fingerprints it; `load_delta` is the only code that
opens a checkpoint: manifest -> base fingerprint check -> strict delta load. `load_checkpoint`
(infer.py, export, the web page, the tests) is the two together; `--init_from` and resuming call
`load_delta` on the model they train.
"""

from __future__ import annotations

import dataclasses
import json
import os

import safetensors
import torch
from peft import set_peft_model_state_dict

from model.build import build_model
from model.freeze import apply_freeze_policy, is_lora
from model.settings import ModelArguments
from run.checkpoint_save import (  # the layout, and the writer: importers take both from here
    ADAPTERS,
    BASE_PATHS,
    CHAT_TEMPLATE,
    DELTA,
    FORMAT_VERSION,
    MANIFEST,
    CheckpointError,
)
from run.checkpoint_save import save_checkpoint as save_checkpoint
from run.fingerprint import fingerprint
from run.inputs import model_inputs
from run.sharding import full_shape, gathered


def _resolve_base(path: str | None, ckpt_dir: str) -> str | None:
    if path is None:
        return None
    inside = os.path.join(ckpt_dir, path)
    return inside if not os.path.isabs(path) and os.path.isdir(inside) else path


def read_manifest(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, MANIFEST)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{ckpt_dir} has no {MANIFEST}: it is not a checkpoint of this repo, or its save was "
            "cut off before it finished. Point at a complete checkpoint folder."
        )
    with open(path) as f:
        manifest = json.load(f)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {version}; this code reads {FORMAT_VERSION}. "
            "Load it with the version of this repo that wrote it."
        )
    return manifest


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{path} is missing, but the checkpoint's {MANIFEST} lists it: the folder is incomplete. "
            "Copy the whole checkpoint folder again or use an earlier checkpoint."
        )
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except Exception as error:  # safetensors raises its own types for truncated headers/data
        raise CheckpointError(
            f"{path} cannot be read ({error}): truncated or corrupt. Copy it again or use an "
            "earlier checkpoint."
        ) from error


def check_base(model, manifest: dict, allow_base_mismatch: bool = False) -> None:
    expected, actual = manifest["base_fingerprint"], model.base_fingerprint
    wrong = [c for c in expected if expected[c] != actual.get(c)]
    if not wrong:
        return
    message = "; ".join(f"{c}: checkpoint trained on {expected[c]}, base is {actual.get(c)}" for c in wrong)
    if allow_base_mismatch:
        print(f"WARNING: --allow_base_mismatch: loading a delta onto another base ({message}).")
        return
    raise CheckpointError(
        f"Base fingerprint mismatch ({message}). This delta was trained on other base weights; "
        f"load it onto {manifest['base']} (or pass --allow_base_mismatch true to force it)."
    )


def apply_delta(model, ckpt_dir: str, manifest: dict, new_adapters_ok: bool = False) -> set[str]:
    """Load the delta tensors and adapters of `ckpt_dir` into `model`, strictly.

    Every saved tensor must land on a parameter of the same shape, every tensor the manifest
    lists must be in the file, and every adapter must fill every LoRA weight of the model.
    `new_adapters_ok` (a later stage, `--init_from`): the model may add LoRA where the parent
    had none (it starts fresh), but never drop an adapter the parent trained.
    Returns the non-LoRA names loaded.
    """
    tensors = _read_safetensors(os.path.join(ckpt_dir, DELTA))
    params = dict(model.named_parameters())
    missing = sorted(set(manifest["tensors"]) - set(tensors))
    unknown = sorted(set(tensors) - set(params))
    misshapen = sorted(
        f"{n} {tuple(t.shape)} vs model {tuple(full_shape(params[n]))}"
        for n, t in tensors.items()
        if n in params and full_shape(params[n]) != t.shape
    )
    problems = []
    if missing:
        problems.append(f"listed in the manifest but absent from {DELTA}: {missing}")
    if unknown:
        problems.append(f"not parameters of the rebuilt model: {unknown}")
    if misshapen:
        problems.append(f"shape mismatch: {misshapen}")
    if problems:
        raise CheckpointError(
            f"{ckpt_dir} does not fit the model its manifest describes ("
            + "; ".join(problems)
            + f"; fingerprint {manifest['base_fingerprint']}). Re-save the checkpoint or rebuild "
            "it with the base and settings it was trained with."
        )
    # Every rank writes, and under ZeRO-3 rank 0's full tensors are scattered back into the shards.
    with gathered([params[n] for n in tensors], modifier_rank=0), torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].dtype))

    adapted = model.adapted_modules()
    saved_adapters = set(manifest.get("adapters", []))
    model_adapters = {ADAPTERS[c] for c in adapted}
    if saved_adapters - model_adapters or (saved_adapters != model_adapters and not new_adapters_ok):
        raise CheckpointError(
            f"{ckpt_dir} holds adapters {sorted(saved_adapters)} but the model has LoRA on "
            f"{sorted(adapted)}: --lora_enable / --lora_target must match the checkpoint's."
        )
    for component, (_, module) in adapted.items():
        if ADAPTERS[component] not in saved_adapters:
            continue  # a new adapter of this stage: PEFT's initialisation (B = 0) stands
        path = os.path.join(ckpt_dir, ADAPTERS[component], "adapter_model.safetensors")
        state = _read_safetensors(path)
        try:
            lora = [p for n, p in module.named_parameters() if is_lora(n)]
            with gathered(lora, modifier_rank=0):
                result = set_peft_model_state_dict(module, state)
        except RuntimeError as error:  # shape mismatches
            raise CheckpointError(f"{path} does not fit the model's LoRA layers: {error}") from error
        missing_lora = [k for k in result.missing_keys if "lora_" in k]
        if result.unexpected_keys or missing_lora:
            raise CheckpointError(
                f"{path}: unexpected {list(result.unexpected_keys)[:10]}, missing "
                f"{missing_lora[:10]}: lora_r / lora_modules must match the checkpoint's."
            )
    return set(tensors)


def load_base(args: ModelArguments, weights: bool = True):
    """The base a config (or a manifest) names, built by `model.build.build_model`, with the
    fingerprint of its weights: what a checkpoint records, and what `load_delta` checks."""
    model = build_model(args, weights=weights)
    if weights:
        model.base_fingerprint = {
            component: fingerprint(module, keep, linear=component == "connector")
            for component, (module, keep) in model.fingerprinted_parts().items()
        }
    return model


def load_delta(model, ckpt_dir: str, new_adapters_ok: bool = False, allow_base_mismatch: bool = False) -> dict:
    """Open `ckpt_dir` onto `model`: its manifest, the base fingerprint check, the strict delta
    load. The one place a checkpoint is read. Returns the manifest."""
    manifest = read_manifest(ckpt_dir)
    check_base(model, manifest, allow_base_mismatch)
    model.inherited_delta = apply_delta(model, ckpt_dir, manifest, new_adapters_ok=new_adapters_ok)
    return manifest


def checkpoint_model_args(ckpt_dir: str, **overrides) -> ModelArguments:
    """The ModelArguments a checkpoint was trained with (its manifest), base paths resolved
    against the folder; `overrides` that are not None replace stored values."""
    manifest = read_manifest(ckpt_dir)
    fields = {f.name for f in dataclasses.fields(ModelArguments)}
    stored = {k: v for k, v in manifest["model_args"].items() if k in fields}
    stored.update({key: _resolve_base(stored.get(key), ckpt_dir) for key in BASE_PATHS})
    stored.update({k: v for k, v in overrides.items() if v is not None})
    return ModelArguments(**stored)


def load_checkpoint(
    ckpt_dir: str,
    base_vision: str | None = None,
    base_llm: str | None = None,
    allow_base_mismatch: bool = False,
    **model_overrides,
):
    """Base (from the manifest, or the overrides) -> fingerprint check -> strict delta load.

    Returns (model, inputs, manifest): the model in eval mode, and its inputs object
    (data/inputs.py: prompts, batches and decoding for the base's kind) with the checkpoint's
    chat template.
    """
    args = checkpoint_model_args(ckpt_dir, vision_model=base_vision, llm_model=base_llm, **model_overrides)
    model = load_base(args)
    manifest = read_manifest(ckpt_dir)
    check_base(model, manifest, allow_base_mismatch)  # before anything else is said of the delta
    apply_freeze_policy(model, args)  # the recipe's trainable set, to check the delta covers it
    untrained = [
        n for n, p in model.named_parameters() if p.requires_grad and not is_lora(n) and n not in manifest["tensors"]
    ]
    if untrained:
        raise CheckpointError(
            f"{ckpt_dir}: the recipe trains {untrained[:10]} (of {len(untrained)}) but the delta "
            "does not hold them: the checkpoint is incomplete."
        )
    load_delta(model, ckpt_dir, allow_base_mismatch=allow_base_mismatch)
    template = os.path.join(ckpt_dir, CHAT_TEMPLATE)
    template = template if os.path.isfile(template) else None
    inputs = model_inputs(model, args, template)
    model.requires_grad_(False)
    model.eval()
    return model, inputs, manifest
