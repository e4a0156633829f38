"""Length-grouped sampling aware of modality: a permutation of every sample, steps of one
modality and similar length, the same order on every rank, and each rank its own share."""

from __future__ import annotations

import random
import statistics

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard

from config import ConfigError, TrainArguments
from data.sampler import ModalityLengthGroupedSampler
from run.trainer import VLMTrainer

BATCH = 4


def mixed(n=203, seed=0):
    """Lengths and modality flags of a set like LLaVA's mix: image samples are long (image
    tokens), text-only ones vary widely."""
    rng = random.Random(seed)
    multimodal = [rng.random() < 0.6 for _ in range(n)]
    lengths = [rng.randint(70, 200) if m else rng.randint(5, 300) for m in multimodal]
    return lengths, multimodal


def batches(order, size=BATCH):
    return [order[k : k + size] for k in range(0, len(order), size)]


def mean_spread(order, lengths):
    return statistics.mean(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches(order))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_a_permutation_whose_steps_hold_one_modality(world_size):
    lengths, multimodal = mixed()
    order = list(ModalityLengthGroupedSampler(lengths, multimodal, BATCH, world_size, seed=1))
    assert sorted(order) == list(range(len(lengths)))
    step = BATCH * world_size
    n_image, n_text = sum(multimodal), len(multimodal) - sum(multimodal)
    full_steps = n_image // step + n_text // step
    assert full_steps > 5
    for k in range(full_steps):  # only the leftovers at the end may mix
        assert len({multimodal[i] for i in order[k * step : (k + 1) * step]}) == 1
    # The step holding the longest sample comes first.
    assert max(lengths) in [lengths[i] for i in order[:step]]


def test_lengths_within_a_batch_are_closer_than_random():
    lengths, multimodal = mixed()
    grouped = list(ModalityLengthGroupedSampler(lengths, multimodal, BATCH, seed=0))
    shuffled = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    assert mean_spread(grouped, lengths) < mean_spread(shuffled, lengths) / 3


def test_each_epoch_a_new_order_the_same_on_every_rank():
    lengths, multimodal = mixed()
    rank0 = ModalityLengthGroupedSampler(lengths, multimodal, BATCH, 2, seed=3)
    rank1 = ModalityLengthGroupedSampler(lengths, multimodal, BATCH, 2, seed=3)
    first, second = list(rank0), list(rank0)
    assert first != second  # a fresh order per epoch
    assert [list(rank1), list(rank1)] == [first, second]  # ...drawn identically on every rank
    rank1.set_epoch(0)
    assert list(rank1) == first  # set_epoch (the Trainer calls it) gives the epoch's order


def test_ddp_sharding_gives_each_rank_its_share_of_one_modality_per_step():
    """accelerate shards the Trainer's batches round-robin over ranks (BatchSamplerShard)."""
    lengths, multimodal = mixed(n=160)  # 160 = 20 steps of 2 x 4: room for every rank's share
    shares = []
    for rank in range(2):  # each rank builds its own sampler, as each runs train.py
        sampler = ModalityLengthGroupedSampler(lengths, multimodal, BATCH, world_size=2, seed=0)
        batch_sampler = torch.utils.data.BatchSampler(sampler, BATCH, drop_last=False)
        shares.append(list(BatchSamplerShard(batch_sampler, num_processes=2, process_index=rank)))
    seen = [i for share in shares for b in share for i in b]
    assert set(seen) == set(range(len(lengths)))
    n_full = sum(multimodal) // 8 + (len(multimodal) - sum(multimodal)) // 8
    for b0, b1 in list(zip(*shares, strict=True))[:n_full]:  # the two ranks' batches of one step
        assert len({multimodal[i] for i in b0 + b1}) == 1


def test_the_trainer_draws_in_the_sampler_s_order(tmp_path):
    lengths, multimodal = mixed(n=40)
    sampler = ModalityLengthGroupedSampler(lengths, multimodal, BATCH, seed=0)
    args = TrainArguments(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, report_to="none",
                          group_by_modality_length=True, seed=0)
    trainer = VLMTrainer(model=torch.nn.Linear(2, 2), args=args, train_dataset=list(range(40)),
                         data_collator=torch.tensor, train_sampler=sampler)
    first = next(iter(trainer.get_train_dataloader())).tolist()
    sampler.set_epoch(0)
    assert first == list(sampler)[:BATCH]


def test_group_by_modality_length_and_group_by_length_are_one_choice(tmp_path):
    with pytest.raises(ConfigError, match="keep one"):
        TrainArguments(output_dir=str(tmp_path), group_by_modality_length=True,
                       train_sampling_strategy="group_by_length")
