"""LLaVA-format records -> (input_ids, labels, images) examples, and the collator that pads them
and turns a batch's images into pixel_values."""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import torch

from constants import IGNORE_INDEX, NUM_FRAMES
from data.chunk_check import PassSettings
from data.media import load_record_media, record_media_count
from data.prepared import PreparedData
from data.prompt import check_fully_masked_share, llava_to_messages
from data.records import DataError, iter_records, normalise_record


def read_records(data_path: str, skip: Collection[int] = ()) -> list[dict]:
    """The normalised records of a LLaVA .json or .jsonl file, leaving out positions in `skip`;
    an unreadable record that is not skipped is an error naming it."""
    return [normalise_record(raw) for raw in iter_records(data_path) if raw.position not in skip]


def record_messages(record: dict, image_folder: str | None, num_frames: int) -> list[dict]:
    """Chat messages with one `<image>` per image or video frame (`load_record_media` gives them
    in that order)."""
    num_images, frames = record_media_count(record, image_folder, num_frames)
    return llava_to_messages(record["conversations"], num_images + frames, frames)


class SupervisedDataset(torch.utils.data.Dataset):
    """The samples of one pass over the records (data/one_pass.py), read from its memory-mapped
    cache (every rank shares the same pages), less the records in `skip` and those the pass
    dropped (too long, nothing supervised). Images are loaded lazily in `__getitem__`; the
    Collator processes them."""

    def __init__(self, prepared: PreparedData, image_folder: str | None, skip: Collection[int] = (),
                 num_frames: int = NUM_FRAMES):
        """`skip`: positions of records left out (the bad ones under --skip_bad_samples);
        `num_frames`: frames sampled from each video."""
        self.prepared, self.image_folder, self.num_frames = prepared, image_folder, num_frames
        self.samples = prepared.selection(skip)  # [samples kept]: indices into the pass's samples
        report, skipped = prepared.report, set(skip)
        too_long = {p.position for p in report.problems if p.kind == "too_long"} - skipped
        fully_masked = {p.position for p in report.problems if p.kind == "no_labels"} - skipped
        check_fully_masked_share(len(fully_masked), len(self.samples) + len(fully_masked))
        if not len(self.samples):
            raise DataError(f"{report.data_path}: no record left to train on.")
        self.num_dropped = report.num_records - len(skipped) - len(self.samples)
        if too_long:
            print(f"Dropped {len(too_long)} of {report.num_records} records longer than max_length.")
        if fully_masked:
            # Never a sample that learns nothing: it would only dilute the loss.
            print(f"Dropped {len(fully_masked)} of {report.num_records} records with no supervised token.")

    def __len__(self) -> int:
        return len(self.samples)

    def lengths(self) -> list[int]:
        """Tokens per sample, image tokens counted."""
        return self.prepared.lengths[self.samples].tolist()

    def multimodal(self) -> list[bool]:
        """Per sample: does it show images (or video frames)?"""
        return self.prepared.multimodal[self.samples].tolist()

    def record(self, i: int) -> dict:
        """Sample i's record as stored: its id and media names (a released VLM's: its turns too)."""
        return self.prepared.record(int(self.samples[i]))

    def __getitem__(self, i: int) -> dict:
        ids, labels = self.prepared.tokens(int(self.samples[i]))
        return {
            "input_ids": torch.from_numpy(ids.astype(np.int64)),  # a copy: the mapped file stays read-only
            "labels": torch.from_numpy(labels.astype(np.int64)),
            "images": load_record_media(self.record(i), self.image_folder, self.num_frames),
        }


def supervised_dataset(data_path: str, image_folder: str | None, tokenizer, num_image_tokens: int,
                       image_token_index: int, max_length: int, skip: Collection[int] = (),
                       num_frames: int = NUM_FRAMES, cache_dir: str | None = None) -> SupervisedDataset:
    """A composed base's samples of a file in one call (tests, benchmarks): its pass, cached in
    `cache_dir` if given."""
    from data.validate import prepare  # data.validate builds on this module's readers

    settings = PassSettings(tokenizer, num_image_tokens, image_token_index, max_length, image_folder, num_frames)
    return SupervisedDataset(prepare(data_path, settings, cache_dir), image_folder, skip, num_frames)


class Collator:
    """Right-pads a list of examples; all their images go through the image processor in one call
    (twice the records/s of one call per record: its per-call overhead dominates on small
    images) into one [N_images, 3, H, W] tensor in example order, which is the order the model
    writes them into the image-token positions."""

    def __init__(self, pad_token_id: int, image_processor):
        self.pad_token_id = pad_token_id
        self.image_processor = image_processor

    def __call__(self, examples: list[dict]) -> dict:
        longest = max(len(e["input_ids"]) for e in examples)
        batch_size = len(examples)
        input_ids = torch.full((batch_size, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, longest), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            input_ids[row, :n] = example["input_ids"]
            labels[row, :n] = example["labels"]
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        images = [image for e in examples for image in e.get("images", [])]
        if images:
            batch["pixel_values"] = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return batch
