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
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def full_shape(param: torch.Tensor) -> torch.Size:
    return getattr(param, "ds_shape", param.shape)  # a ZeRO-3 shard is empty; DeepSpeed keeps the shape


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether the weights are ZeRO-3 or FSDP shards: only all ranks together can run the model."""
    return any(is_partitioned(p) or isinstance(p, DTensor) for p in model.parameters())


def describe_engine(wrapped: torch.nn.Module, model: torch.nn.Module) -> str:
    """What really trained the model, one line: a request for FSDP that ended up as plain DDP
    (as accelerate does on CPU unless told otherwise) shows here."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if hasattr(wrapped, "zero_optimization_stage"):  # deepspeed.DeepSpeedEngine
        engine = f"DeepSpeed ZeRO-{wrapped.zero_optimization_stage()}"
    elif isinstance(model, FSDPModule):
        shards = sum(isinstance(m, FSDPModule) for m in model.modules())
        engine = f"FSDP2 (fully_shard: {shards} sharded modules)"
    elif type(wrapped).__name__ == "FullyShardedDataParallel":
        engine = "FSDP1"
    elif isinstance(wrapped, DistributedDataParallel):
        engine = "DDP"
    else:
        engine = "no data parallelism"
    return f"engine: {engine}, {world} process{'es' if world > 1 else ''}"


def gathered(params, modifier_rank: int | None = None):
    """Inside the block, ZeRO-3 parameters hold their full tensors; with `modifier_rank`, what
    that rank writes into them is scattered back to every shard on exit. A collective: every
    rank must enter. Without ZeRO-3 it does nothing."""
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        return nullcontext()
    import deepspeed  # an optional extra, present whenever a parameter is partitioned

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank)
