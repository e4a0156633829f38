"""Length-grouped sampling aware of modality (LLaVA's `group_by_modality_length`).

A batch mixing a text-only sample with image samples pays for a blank image through the vision
tower, and a batch mixing lengths pays for padding. So: image and text-only samples are grouped
apart, and within each, samples of similar length (image tokens counted) share a batch.

The order is global and the same on every rank (seeded by `seed` and the epoch): each "step" is
`batch_size * world_size` consecutive indices, one modality, cut from one length-sorted
mega-batch, and accelerate's DDP sharding hands batch k to rank k % world_size, so in a step
every rank gets one batch of the same modality and similar length.
"""

from __future__ import annotations

import torch

# Samples sorted together: larger groups lengths more tightly, smaller keeps more randomness
# (transformers' LengthGroupedSampler uses 50 batches too).
MEGA_BATCH_FACTOR = 50


def _steps(indices: list[int], lengths: list[int], step_size: int, generator) -> tuple[list[list[int]], list[int]]:
    """(full steps of one modality, the leftover indices) from a shuffled group."""
    order = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
    mega = step_size * MEGA_BATCH_FACTOR
    steps, leftover = [], []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: lengths[i], reverse=True)
        full = len(chunk) - len(chunk) % step_size
        steps += [chunk[k : k + step_size] for k in range(0, full, step_size)]
        leftover += chunk[full:]
    return steps, leftover


class ModalityLengthGroupedSampler(torch.utils.data.Sampler):
    """A permutation of all indices: steps of `batch_size * world_size` samples of one modality
    and similar length, in random order, the one holding the longest sample first (a batch that
    does not fit in memory fails at step 1, not hours in). The leftovers of both modalities that
    fill no whole step come last, mixed."""

    def __init__(self, lengths: list[int], multimodal: list[bool], batch_size: int, world_size: int = 1,
                 seed: int = 0):
        if len(lengths) != len(multimodal):
            raise ValueError(f"{len(lengths)} lengths but {len(multimodal)} modality flags.")
        self.lengths, self.multimodal = list(lengths), list(multimodal)
        self.step_size = batch_size * max(1, world_size)
        self.seed, self.epoch = seed, 0

    def __len__(self) -> int:
        return len(self.lengths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1  # without set_epoch, the next epoch still draws a new order
        steps, leftover = [], []
        for modality in (True, False):
            group = [i for i, m in enumerate(self.multimodal) if m == modality]
            group_steps, group_leftover = _steps(group, self.lengths, self.step_size, generator)
            steps += group_steps
            leftover += group_leftover
        steps = [steps[i] for i in torch.randperm(len(steps), generator=generator).tolist()]
        if steps:
            longest = max(range(len(steps)), key=lambda s: max(self.lengths[i] for i in steps[s]))
            steps.insert(0, steps.pop(longest))
        return iter([i for step in steps for i in step] + leftover)


def modality_length_sampler(dataset, train_args) -> ModalityLengthGroupedSampler | None:
    """The sampler `--group_by_modality_length true` asks for (None otherwise: the Trainer's)."""
    if not train_args.group_by_modality_length:
        return None
    return ModalityLengthGroupedSampler(
        dataset.lengths(), dataset.multimodal(), train_args.train_batch_size, train_args.world_size,
        seed=train_args.seed,
    )
