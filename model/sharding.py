"""Whole tensors from sharded engines.

Under DeepSpeed ZeRO-3 every rank keeps only a shard of each parameter: the module's own
tensor is empty (`torch.Size([0])`, the peers' "size mismatch ... torch.Size([0])" errors).
Code that reads or writes whole base weights outside the forward pass (the fingerprint, loading
a parent stage's delta) gathers them first. Saving does not: the Trainer already hands
`_save` a state dict of full tensors gathered by the engine (ZeRO-3 and FSDP alike).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.distributed.tensor import DTensor


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether the weights are ZeRO-3 or FSDP shards: only all ranks together can run the model."""
    return any(is_partitioned(p) or isinstance(p, DTensor) for p in model.parameters())


def gathered(params, modifier_rank: int | None = None):
    """Inside the block, ZeRO-3 parameters hold their full tensors; with `modifier_rank`, what
    that rank writes into them is scattered back to every shard on exit. A collective: every
    rank must enter. Without ZeRO-3 it does nothing."""
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        return nullcontext()
    import deepspeed  # an optional extra, present whenever a parameter is partitioned

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank)
