"""The private internals of TRL and torch that only the benchmarks read, in one module (the
project's own are in the top-level patches.py; nothing else in bench/ touches a private name).

Each reader names the pinned version it was written against and is guarded: where the private
name is gone it raises `PinnedInternalGone`, naming what to update, instead of a bare
AttributeError deep in a benchmark; tests/bench/test_bench_patches.py pins each one, so an
upgrade fails there, by name.

1. `cap_trl_chunk_size`, `trl_chunk_size`: TRL 1.16's chunked LM-head loss reads its tile width
   over the vocabulary from a module constant, `trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE`.
2. `trl_uses_triton`: TRL 1.16 picks its Triton kernel by a private function,
   `trl.kernels.chunked_logprob._use_triton`.
3. `torch_default_chunk_rows`: torch 2.14's `LinearCrossEntropyOptions` picks its default chunk in
   a private `_adjust` (the loss benchmark reports it).
"""

from __future__ import annotations

TRL_CHUNK_CONSTANT = "_CHUNKED_LOGPROB_CHUNK_SIZE"


class PinnedInternalGone(RuntimeError):
    """A library no longer has the private name a benchmark reads: update bench/patches.py."""


def _read(owner, name: str, pinned: str):
    if not hasattr(owner, name):
        raise PinnedInternalGone(f"{owner.__name__}.{name} is gone (written against {pinned}): "
                                 "update bench/patches.py to what the installed version does instead.")
    return getattr(owner, name)


def _trl_utils():
    import trl.trainer.utils

    _read(trl.trainer.utils, TRL_CHUNK_CONSTANT, "trl 1.16")
    return trl.trainer.utils


def trl_chunk_size() -> int:
    """TRL's tile width over the vocabulary (its chunked LM-head loss)."""
    return getattr(_trl_utils(), TRL_CHUNK_CONSTANT)


def cap_trl_chunk_size(vocab_size: int) -> None:
    """TRL's chunked LM-head loss splits the vocabulary in chunks of a module constant; at a tiny
    vocabulary a chunk larger than it fails. The training benchmark's peer sets it no larger."""
    setattr(_trl_utils(), TRL_CHUNK_CONSTANT, min(trl_chunk_size(), vocab_size))


def trl_uses_triton(device) -> bool:
    """Whether TRL's chunked log-prob runs its Triton kernel on this device."""
    import trl.kernels.chunked_logprob

    return _read(trl.kernels.chunked_logprob, "_use_triton", "trl 1.16")(device)


def torch_default_chunk_rows(rows: int, hidden: int, vocab: int, dtype, device) -> int:
    """The rows per chunk torch's chunked linear_cross_entropy takes by default."""
    from torch.nn import LinearCrossEntropyOptions

    adjust = _read(LinearCrossEntropyOptions, "_adjust", "torch 2.14")
    return adjust(LinearCrossEntropyOptions(), rows, hidden, vocab, dtype, device).batch_chunk_size
