"""Packed batches (`--packing true`): rows of whole samples up to a packing length, no padding
between them, and nothing a sample can see of the others.

`PackedBatchSampler` plans the rows: each epoch, the samples in a seeded random order, a window
at a time, placed by best fit (longest first, each into the open row it fills most tightly), the
rows of a window in random order; so the data order stays close to random and the plan is a
function of (seed, epoch) alone: every rank makes the same one, takes its own rows of each step,
and a resumed run lands on the same batches. Every rank gets the same number of steps (the last
step is filled up with rows from the epoch's start, as torch's DistributedSampler pads).

`PackingCollator` makes the batch: the kind's own collator makes every sample as usual (each its
own padded row: its processor, its images in sample order), then the samples are laid end to end
into rows in the order given, so that images stay in token order. `position_ids` restart at 0 at
each sample and there is no attention mask: transformers builds the block-diagonal causal mask
from those positions (model/packing.py). Each sample's first label is dropped: the previous
sample's last token would predict it, and alone, nothing does. So the supervised tokens, and
`num_items_in_batch`, are exactly the padded batch's.
"""

from __future__ import annotations

import bisect

import torch
from transformers.trainer_pt_utils import BatchRebalanceSampler

from constants import IGNORE_INDEX
from data.processor_prompt import SEQUENCE_KEYS

# Samples placed together: larger packs rows fuller, smaller keeps the order closer to random.
PACKING_WINDOW = 1000


def best_fit_rows(indices: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    """`indices` placed into rows of at most `capacity` tokens, longest first, each into the open
    row with the least room that still fits it (a sample longer than `capacity` alone in a row).
    Ties keep the order of `indices`."""
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, row number), sorted
    for i in sorted(indices, key=lambda i: -lengths[i]):
        at = bisect.bisect_left(room, (lengths[i], -1))
        if at == len(room):
            rows.append([i])
            left, row = capacity - lengths[i], len(rows) - 1
        else:
            left, row = room.pop(at)
            rows[row].append(i)
            left -= lengths[i]
        if left > 0:
            bisect.insort(room, (left, row))
    return rows


def contiguous_rows(lengths: list[int], capacity: int) -> list[tuple[int, int]]:
    """(start, end) runs of consecutive samples, each run at most `capacity` tokens (a longer
    sample alone): a new row opens only where the next sample does not fit. Never more rows than
    any other split into runs: given the planned rows in order, it needs no more of them."""
    runs, start, used = [], 0, 0
    for k, n in enumerate(lengths):
        if k > start and used + n > capacity:
            runs.append((start, k))
            start, used = k, 0
        used += n
    return runs + [(start, len(lengths))] if lengths else runs


class PackedBatchSampler(BatchRebalanceSampler):
    """Each rank's batches of `rows_per_device` packed rows (the indices of their samples, row
    after row). A `BatchRebalanceSampler` only in kind: transformers' Trainer hands one to the
    DataLoader as its `batch_sampler` and leaves its rank split alone (accelerate would otherwise
    shard it a second time); the plan here is its own."""

    def __init__(self, lengths: list[int], capacity: int, rows_per_device: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0, multimodal: list[bool] | None = None):
        """`multimodal`: per sample, does it show images; given, a step's rows are all of one kind
        (`--group_by_modality_length`: no blank image through the tower for a text-only row)."""
        self.lengths, self.capacity = list(lengths), capacity
        self.rows_per_device, self.world_size, self.rank = rows_per_device, max(1, world_size), rank
        self.seed, self.epoch, self.multimodal = seed, 0, multimodal
        self._plans: dict[int, list[list[list[int]]]] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def sampler(self):
        """accelerate's DataLoader shard sets the epoch of its batch sampler's `sampler`."""
        return self

    def steps(self, epoch: int) -> list[list[list[int]]]:
        """The global steps of `epoch`: each `rows_per_device * world_size` rows of sample indices."""
        if epoch not in self._plans:
            self._plans[epoch] = self.plan_steps(torch.Generator().manual_seed(self.seed + epoch))
        return self._plans[epoch]

    def plan_steps(self, generator) -> list[list[list[int]]]:
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        kinds = [order] if self.multimodal is None else [[i for i in order if self.multimodal[i] == m] for m in (True, False)]
        per_step = self.rows_per_device * self.world_size
        steps, leftover = [], []
        for kind in kinds:
            rows = []
            for start in range(0, len(kind), PACKING_WINDOW):
                window = best_fit_rows(kind[start : start + PACKING_WINDOW], self.lengths, self.capacity)
                rows += [window[r] for r in torch.randperm(len(window), generator=generator).tolist()]
            full = len(rows) - len(rows) % per_step
            steps += [rows[k : k + per_step] for k in range(0, full, per_step)]
            leftover += rows[full:]
        steps = [steps[s] for s in torch.randperm(len(steps), generator=generator).tolist()]
        if leftover:  # a last step on every rank: filled with the epoch's first rows
            first = [row for step in steps for row in step] or leftover
            filler = (first * (per_step // len(first) + 1))[: per_step - len(leftover)]
            steps.append(leftover + filler)
        return steps

    def __iter__(self):
        for step in self.steps(self.epoch):
            mine = step[self.rank * self.rows_per_device : (self.rank + 1) * self.rows_per_device]
            yield [i for row in mine for i in row]

    def __len__(self) -> int:
        return len(self.steps(self.epoch))


def packed_batch_sampler(dataset, capacity: int, train_args) -> PackedBatchSampler:
    """The sampler of `--packing true` for the Trainer's arguments (batch size as rows per device,
    ranks, seed, `--group_by_modality_length`)."""
    return PackedBatchSampler(
        dataset.lengths(), capacity, train_args.per_device_train_batch_size, train_args.world_size,
        train_args.process_index, train_args.seed,
        dataset.multimodal() if train_args.group_by_modality_length else None,
    )


class PackingCollator:
    """The kind's collator, then its samples laid end to end into rows of at most `capacity`
    tokens (one row holding them all when `rows_per_device` is 1: flash-attention's packed path
    reads a single row). Returns input_ids, labels, position_ids [R, L] (and the kind's other
    per-token inputs, packed alike), with every per-image input as the collator made it."""

    def __init__(self, collator, capacity: int, rows_per_device: int, pad_token_id: int):
        self.collator, self.capacity = collator, capacity
        self.rows_per_device, self.pad_token_id = rows_per_device, pad_token_id

    def __call__(self, samples: list) -> dict[str, torch.Tensor]:
        batch = self.collator(samples)  # every sample its own row, padded: [n, longest]
        lengths = batch.pop("attention_mask").sum(dim=1).tolist()
        one_row = self.rows_per_device == 1
        runs = [(0, len(lengths))] if one_row else contiguous_rows(lengths, self.capacity)
        width = max(sum(lengths[a:b]) for a, b in runs)
        keys = [k for k in (*SEQUENCE_KEYS, "labels") if k in batch]
        fill = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX}
        packed = {k: batch[k].new_full((len(runs), width), fill.get(k, 0)) for k in keys}  # [R, width]
        positions = torch.zeros((len(runs), width), dtype=torch.long)
        for row, (a, b) in enumerate(runs):
            at = 0
            for k in range(a, b):
                n = lengths[k]
                for key in keys:
                    packed[key][row, at : at + n] = batch[key][k, :n]
                packed["labels"][row, at] = IGNORE_INDEX  # no token of this row predicts it
                positions[row, at : at + n] = torch.arange(n)
                at += n
            positions[row, at:] = torch.arange(width - at)  # the padding: a sample of its own, unlabelled
        return {**{k: v for k, v in batch.items() if k not in keys}, **packed, "position_ids": positions}
