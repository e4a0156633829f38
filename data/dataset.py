"""LLaVA-format records -> (input_ids, labels, pixel_values) examples, and the padding collator."""

from __future__ import annotations

import os

import datasets
import torch
from PIL import Image, ImageOps

from data.prompt import IGNORE_INDEX, SampleTooLong, llava_to_messages, tokenize_conversation


def read_records(data_path: str) -> datasets.Dataset:
    """A LLaVA .json (one list of records) or .jsonl file, read (and cached) by `datasets`."""
    return datasets.load_dataset("json", data_files=data_path, split="train")


def image_paths(record: dict, image_folder: str | None) -> list[str]:
    images = record.get("image")
    if images is None:
        return []
    images = [images] if isinstance(images, str) else list(images)
    return [os.path.join(image_folder or "", name) for name in images]


def load_image(path: str) -> Image.Image:
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
        return image.convert("RGB")


class SupervisedDataset(torch.utils.data.Dataset):
    """Tokenizes every record once up front (so over-long samples are dropped, and counted,
    before step 1) and loads images lazily in `__getitem__`."""

    def __init__(
        self,
        data_path: str,
        image_folder: str | None,
        tokenizer,
        image_processor,
        num_image_tokens: int,
        image_token_index: int,
        max_length: int,
    ):
        self.image_folder = image_folder
        self.image_processor = image_processor

        def tokenize(record):
            try:
                ids, labels = tokenize_conversation(
                    tokenizer,
                    llava_to_messages(record["conversations"]),
                    num_image_tokens,
                    image_token_index,
                    max_length,
                )
            except SampleTooLong:
                ids, labels = [], []
            return {"input_ids": ids, "labels": labels}

        records = read_records(data_path)
        tokenized = records.map(tokenize, desc="tokenizing")
        self.records = tokenized.filter(lambda r: len(r["input_ids"]) > 0)
        self.num_dropped = len(tokenized) - len(self.records)
        if self.num_dropped:
            print(f"Dropped {self.num_dropped} of {len(tokenized)} records longer than max_length {max_length}.")

    def __len__(self) -> int:
        return len(self.records)

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.records["input_ids"]]

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        example = {
            "input_ids": torch.tensor(record["input_ids"]),
            "labels": torch.tensor(record["labels"]),
        }
        images = [load_image(p) for p in image_paths(record, self.image_folder)]
        if images:
            example["pixel_values"] = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return example


class Collator:
    """Right-pads a list of examples; all their images go into one [N_images, 3, H, W] tensor in
    example order, which is the order the model writes them into the image-token positions."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

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
        pixel_values = [e["pixel_values"] for e in examples if "pixel_values" in e]
        if pixel_values:
            batch["pixel_values"] = torch.cat(pixel_values)
        return batch
