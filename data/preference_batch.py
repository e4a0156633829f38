"""Preference pairs as model inputs: one dataset row per pair, one batch of 2B rows per B pairs.

A batch's rows are [chosen_0 .. chosen_B-1, rejected_0 .. rejected_B-1] (TRL's order), each
tokenized and labelled by the base's own supervised dataset (the label rule, the turn end, the
length cut: data/inputs.py's `training_set`), so a pair's answers are learnt exactly as an SFT
answer is. The images are given once per pair: the model runs its tower and connector once and
writes the features into both rows (`model/preference.py`).
"""

from __future__ import annotations

import torch

from constants import IGNORE_INDEX
from data.records import DataError

# Inputs of one value per token position (data/processor_prompt.py's SEQUENCE_KEYS, and labels):
# stacked row by row; everything else a processor returns is per image.
ROW_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "labels")


class PairDataset(torch.utils.data.Dataset):
    """`chosen[i]` and `rejected[i]`: the same pair's two conversations as the base's supervised
    dataset gives them. `reference`: [pairs, 2] the reference log-probs (chosen, rejected) once
    computed (run/preference.py), then part of every item."""

    def __init__(self, chosen, rejected):
        if len(chosen) != len(rejected):
            raise DataError(
                f"{len(chosen)} chosen but {len(rejected)} rejected conversations left after tokenizing: "
                "with --validate_data false a pair whose one answer is too long or unlabelled is not "
                "left out as a whole. Run with --validate_data true."
            )
        self.chosen, self.rejected = chosen, rejected
        self.reference: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.chosen)

    def lengths(self) -> list[int]:
        """A pair's length for the length-grouped sampler: its longer row (both are padded to it)."""
        return [max(c, r) for c, r in zip(self.chosen.lengths(), self.rejected.lengths(), strict=True)]

    def multimodal(self) -> list[bool]:
        return self.chosen.multimodal()

    def __getitem__(self, i: int) -> dict:
        item = {"chosen": self.chosen[i], "rejected": self.rejected[i]}
        if self.reference is not None:
            item["reference"] = self.reference[i]
        return item


def _with_reference(batch: dict, items: list[dict]) -> dict:
    """`reference_logps` [2B] in the rows' order, where the dataset holds them."""
    if "reference" in items[0]:
        reference = torch.stack([item["reference"] for item in items])  # [B, 2]
        batch["reference_logps"] = torch.cat([reference[:, 0], reference[:, 1]])
    return batch


class PairCollator:
    """A composed base's pairs through its own collator: the 2B rows padded together, and
    pixel_values [N, 3, H, W] of the chosen rows' images only (the rejected rows share them)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, items: list[dict]) -> dict:
        rows = [item["chosen"] for item in items] + [{**item["rejected"], "images": []} for item in items]
        return _with_reference(self.collator(rows), items)


def _pad_to(tensor: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (0, length - tensor.shape[1]), value=value)


def stack_halves(chosen: dict, rejected: dict, pad_token_id: int) -> dict:
    """Two processor batches of the same B prompts -> one batch of 2B rows (right-padded to the
    longer), `pair_vision`: the chosen half's vision inputs (the images, once), and every other
    per-image value (grid sizes, image sizes) for both halves, which the LLM's positions read."""
    length = max(chosen["input_ids"].shape[1], rejected["input_ids"].shape[1])
    pads = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}
    batch = {
        key: torch.cat([_pad_to(chosen[key], length, pads.get(key, 0)), _pad_to(rejected[key], length, pads.get(key, 0))])
        for key in ROW_KEYS if key in chosen
    }
    vision = {key: value for key, value in chosen.items() if key not in ROW_KEYS}
    if vision:
        batch["pair_vision"] = vision
    for key, value in vision.items():
        if not key.startswith("pixel_"):
            batch[key] = torch.cat([value, rejected[key]])
    return batch


class ProcessorPairCollator:
    """A released VLM's pairs through its own collator, once per half: the processor expands the
    rejected rows' image tokens from the same images (a CPU cost in the DataLoader workers); the
    model's tower and connector then run on the chosen half's vision inputs alone."""

    def __init__(self, collator, pad_token_id: int):
        self.collator, self.pad_token_id = collator, pad_token_id

    def __call__(self, items: list[dict]) -> dict:
        chosen = self.collator([item["chosen"] for item in items])
        rejected = self.collator([item["rejected"] for item in items])
        return _with_reference(stack_halves(chosen, rejected, self.pad_token_id), items)
