"""A cheap fingerprint of base weights, so a delta is never applied to the wrong base."""

import hashlib

import torch
from torch import nn

from model.sharding import gathered

SAMPLES_PER_TENSOR = 4096


def fingerprint(module: nn.Module) -> str:
    """sha256 over a strided sample of every parameter outside linear layers.

    Linear weights are skipped so that the fingerprint is the same whether the base loads in
    fp32, bf16, 8-bit or 4-bit; the embeddings, norms and patch embeddings that remain differ
    between any two trained (or two differently seeded) bases. Values are rounded to bf16 first
    for the same reason.
    """
    sampled = [
        (f"{module_name}.{name}", param)
        for module_name, child in sorted(module.named_modules(), key=lambda item: item[0])
        if not isinstance(child, nn.Linear)
        for name, param in sorted(child.named_parameters(recurse=False))
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
