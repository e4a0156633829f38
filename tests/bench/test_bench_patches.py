"""bench/patches.py: each reader of a TRL or torch internal that only the benchmarks use is pinned
here, and says what to update when the name is gone."""

from __future__ import annotations

import pytest
import torch
import trl.trainer.utils
from torch.nn import LinearCrossEntropyOptions

from bench import patches


def test_trl_chunk_size_is_read_and_capped():
    size = patches.trl_chunk_size()
    assert isinstance(size, int) and size > 64
    try:
        patches.cap_trl_chunk_size(64)
        assert patches.trl_chunk_size() == 64
        patches.cap_trl_chunk_size(10**9)  # never wider than it was
        assert patches.trl_chunk_size() == 64
    finally:
        setattr(trl.trainer.utils, patches.TRL_CHUNK_CONSTANT, size)


def test_the_loss_benchmarks_readings_of_torch_and_trl():
    assert isinstance(patches.trl_uses_triton(torch.device("cpu")), bool)
    # torch's default chunk shrinks as the vocabulary grows (8 rows at 151,936 words, measured).
    small = patches.torch_default_chunk_rows(1024, 896, 4096, torch.float32, torch.device("cpu"))
    large = patches.torch_default_chunk_rows(1024, 896, 151936, torch.float32, torch.device("cpu"))
    assert 1 <= large < small <= 1024


def test_a_reader_whose_private_name_is_gone_says_what_to_update(monkeypatch):
    monkeypatch.delattr(trl.trainer.utils, patches.TRL_CHUNK_CONSTANT)
    with pytest.raises(patches.PinnedInternalGone, match=r"_CHUNKED_LOGPROB_CHUNK_SIZE is gone .*bench/patches\.py"):
        patches.trl_chunk_size()
    monkeypatch.delattr(LinearCrossEntropyOptions, "_adjust")
    with pytest.raises(patches.PinnedInternalGone, match="LinearCrossEntropyOptions._adjust is gone"):
        patches.torch_default_chunk_rows(8, 8, 8, torch.float32, torch.device("cpu"))
