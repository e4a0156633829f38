"""A cheap fingerprint of base weights, so a delta is never applied to the wrong base."""

import hashlib
import re

import torch
from torch import nn

from run.sharding import gathered

SAMPLES_PER_TENSOR = 4096


def base_name(name: str) -> str:
    """A parameter's name in the base as loaded: without the wrappers PEFT adds around it
    (`base_model.model.` around the model, `.base_layer` inside each adapted layer), so a base
    fingerprints the same before and after LoRA is added."""
    return re.sub(r"(^|\.)base_model\.model(\.|$)", r"\1", name).replace(".base_layer", "")


def fingerprint(module: nn.Module, keep=None, linear: bool = False) -> str:
    """sha256 over a strided sample of every parameter outside linear layers.

    Linear weights are skipped so that the fingerprint is the same whether the base loads in
    fp32, bf16, 8-bit or 4-bit; the embeddings, norms and patch embeddings that remain differ
    between any two trained (or two differently seeded) bases. Values are rounded to bf16 first
    for the same reason. Adapters are not base weights and are skipped. `keep(name)`: which
    parameters of `module` count (a released VLM's components share one module tree); `linear`:
    sample linear weights too (a part that is never quantized, a released model's connector).
    """
    modules = sorted(((base_name(name), child) for name, child in module.named_modules()), key=lambda item: item[0])
    sampled = [
        (f"{module_name}.{name}".lstrip("."), param)
        for module_name, child in modules
        if linear or not isinstance(child, nn.Linear)
        for name, param in sorted(child.named_parameters(recurse=False))
        if "lora_" not in name and (keep is None or keep(f"{module_name}.{name}"))
    ]
    digest = hashlib.sha256()
    with gathered([param for _, param in sampled]):  # ZeRO-3 shards are empty until gathered
        for name, param in sampled:
            flat = param.detach().reshape(-1)
            # Evenly spaced, first and last included; in integers: a float32 linspace rounds the
            # last index of a tensor over 2^24 values (any real embedding table) past its end.
            count = min(flat.numel(), SAMPLES_PER_TENSOR)
            index = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)
            sample = flat[index].to(torch.bfloat16).float().cpu()
            digest.update(f"{name}{tuple(param.shape)}".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]
