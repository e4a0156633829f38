"""LLaVA-format records -> (input_ids, labels, images) examples, and the collator that pads them
and turns a batch's images into pixel_values."""

from __future__ import annotations

from collections.abc import Collection

import datasets
import numpy as np
import pyarrow.compute as pc
import torch

from constants import IGNORE_INDEX, NUM_FRAMES
from data.media import load_record_media, record_media_count
from data.prompt import (
    SampleTooLong,
    check_fully_masked_share,
    llava_to_messages,
    tokenize_conversation,
)
from data.records import DataError, RawRecord, iter_records


def normalise_record(raw: RawRecord) -> dict:
    """One record as {"id": str, "image": [names], "video": name | None, "conversations":
    [{"from", "value"}]}: ids may be numbers, "image" a name or a list, and extra keys anything;
    the loaders need one shape. Validation (data/validate.py) says in detail what is wrong with
    a record that fails here."""
    if raw.error is not None:
        named = f" (id {raw.record_id})" if raw.record_id is not None else ""
        raise DataError(f"{raw.location}{named}: {raw.error}")
    record = raw.record
    try:
        images = record.get("image")
        images = [] if images is None else [images] if isinstance(images, str) else [str(i) for i in images]
        conversations = [{"from": str(t["from"]), "value": str(t["value"])} for t in record["conversations"]]
    except (KeyError, TypeError) as e:
        raise DataError(
            f"{raw.location} (id {raw.record_id}): not a LLaVA record ({e!r}); run scripts/check_data.py."
        ) from e
    video = record.get("video")
    return {"id": raw.record_id or raw.location, "image": images, "video": None if video is None else str(video),
            "conversations": conversations}


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
    """Tokenizes every record once up front (so over-long samples are dropped, and counted,
    before step 1) and loads images lazily in `__getitem__`; the Collator processes them."""

    def __init__(
        self,
        data_path: str,
        image_folder: str | None,
        tokenizer,
        num_image_tokens: int,
        image_token_index: int,
        max_length: int,
        skip: Collection[int] = (),
        num_frames: int = NUM_FRAMES,
    ):
        """`skip`: positions of records left out (the bad ones under --skip_bad_samples);
        `num_frames`: frames sampled from each video."""
        self.image_folder = image_folder
        self.num_frames = num_frames

        def tokenize(record):
            messages = record_messages(record, image_folder, num_frames)
            try:
                ids, labels = tokenize_conversation(
                    tokenizer, messages, num_image_tokens, image_token_index, max_length
                )
            except SampleTooLong:
                ids, labels = [], []
            return {"input_ids": ids, "labels": labels}

        records = read_records(data_path, skip)
        if not records:
            raise DataError(f"{data_path}: no record left to train on.")
        tokenized = datasets.Dataset.from_list(records).map(tokenize, desc="tokenizing")
        too_long = [len(ids) == 0 for ids in tokenized["input_ids"]]
        fully_masked = [
            bool(ids) and all(label == IGNORE_INDEX for label in labels)
            for ids, labels in zip(tokenized["input_ids"], tokenized["labels"], strict=True)
        ]
        check_fully_masked_share(sum(fully_masked), len(tokenized) - sum(too_long))
        keep = [i for i in range(len(tokenized)) if not (too_long[i] or fully_masked[i])]
        kept = tokenized.select(keep).flatten_indices()
        self.input_ids, self.offsets = _flatten(kept, "input_ids")  # [total tokens], [samples + 1]
        self.labels, _ = _flatten(kept, "labels")
        self.media = kept.select_columns(["image", "video"]).to_list()  # names only, per sample
        self.num_dropped = len(tokenized) - len(keep)
        if sum(too_long):
            print(f"Dropped {sum(too_long)} of {len(tokenized)} records longer than max_length {max_length}.")
        if sum(fully_masked):
            # Never a sample that learns nothing: it would only dilute the loss.
            print(f"Dropped {sum(fully_masked)} of {len(tokenized)} records with no supervised token.")

    def __len__(self) -> int:
        return len(self.media)

    def lengths(self) -> list[int]:
        return np.diff(self.offsets).tolist()

    def multimodal(self) -> list[bool]:
        """Per sample: does it show images (or video frames)?"""
        return [bool(m["image"]) or bool(m["video"]) for m in self.media]

    def __getitem__(self, i: int) -> dict:
        start, end = self.offsets[i], self.offsets[i + 1]
        return {
            "input_ids": torch.from_numpy(self.input_ids[start:end].astype(np.int64)),
            "labels": torch.from_numpy(self.labels[start:end].astype(np.int64)),
            "images": load_record_media(self.media[i], self.image_folder, self.num_frames),
        }


def _flatten(table: datasets.Dataset, column: str) -> tuple[np.ndarray, np.ndarray]:
    """A column of token-id lists as one flat int32 array and the offsets of its rows: a sample
    is a slice. Formatting an Arrow row into Python lists and those into tensors cost more than
    decoding its image; int32 halves the memory (ids, -100 and the image id all fit), and numpy
    arrays stay shared, not copied, in forked DataLoader workers."""
    lists = table.data.column(column).combine_chunks()
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return lists.flatten().to_numpy(zero_copy_only=False).astype(np.int32), offsets


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
