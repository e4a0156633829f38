"""LLaVA-format records -> (input_ids, labels, images) examples, and the collator that pads them
and turns a batch's images into pixel_values."""

from __future__ import annotations

import os
import re
from collections.abc import Collection

import datasets
import numpy as np
import torch
from PIL import Image, ImageOps

from data.prompt import (
    IGNORE_INDEX,
    SampleTooLong,
    check_fully_masked_share,
    llava_to_messages,
    tokenize_conversation,
)
from data.records import DataError, RawRecord, iter_records


class ImageError(DataError):
    """An image that cannot be used as it is: unsafe path, too large, unreadable."""


def normalise_record(raw: RawRecord) -> dict:
    """One record as {"id": str, "image": [names], "video": name | None, "conversations":
    [{"from", "value"}]}: ids may be numbers, "image" a name or a list, and extra keys anything;
    the loaders need one shape. Validation (data/validate.py) says in detail what is wrong with
    a record that fails here."""
    if raw.error is not None:
        raise DataError(f"{raw.location}: {raw.error}")
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


def resolve_image_path(image_folder: str | None, name: str) -> str:
    """`name` inside `image_folder` (the working directory when None). Absolute names and `..`
    that climb out of the folder are refused: a data file must not read arbitrary files.
    The check is on the path as written; links inside the folder are followed as usual."""
    if not isinstance(name, str) or not name.strip():
        raise ImageError(f"image name {name!r} is not a file name.")
    root = os.path.normpath(image_folder or ".")
    path = os.path.normpath(os.path.join(root, name))
    if os.path.isabs(name) or os.path.relpath(path, root).split(os.sep)[0] == os.pardir:
        raise ImageError(
            f"image path {name!r} escapes --image_folder {image_folder!r}: image paths must be "
            "relative to the folder and stay inside it."
        )
    return path


def image_paths(record: dict, image_folder: str | None) -> list[str]:
    images = record.get("image")
    if images is None:
        return []
    images = [images] if isinstance(images, str) else list(images)
    return [resolve_image_path(image_folder, name) for name in images]


FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def _natural_key(name: str) -> list:
    """frame_2.jpg before frame_10.jpg."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def video_frame_paths(folder: str, num_frames: int) -> list[str]:
    """`num_frames` frames sampled uniformly from a folder of frame images (the middle of each
    of `num_frames` equal segments, as Ask-Anything samples), in time (natural name) order;
    all of them when there are fewer."""
    if not os.path.isdir(folder):
        raise ImageError(f"video {folder}: not a folder of frame images.")
    frames = sorted((f for f in os.listdir(folder) if f.lower().endswith(FRAME_EXTENSIONS)), key=_natural_key)
    if not frames:
        raise ImageError(f"video {folder}: no frame images ({', '.join(FRAME_EXTENSIONS)}).")
    count = min(num_frames, len(frames))
    return [os.path.join(folder, frames[int((i + 0.5) * len(frames) / count)]) for i in range(count)]


def media_paths(record: dict, image_folder: str | None, num_frames: int) -> tuple[list[str], int]:
    """(the images a record's prompt shows, in order; how many of them are video frames)."""
    if record.get("video"):
        frames = video_frame_paths(resolve_image_path(image_folder, record["video"]), num_frames)
        return frames, len(frames)
    return image_paths(record, image_folder), 0


def record_messages(record: dict, image_folder: str | None, num_frames: int) -> tuple[list[dict], list[str]]:
    """(chat messages with one `<image>` per image or frame, the image paths in that order)."""
    paths, frames = media_paths(record, image_folder, num_frames)
    return llava_to_messages(record["conversations"], len(paths), frames), paths


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """I;16 / I / F (16-bit PNG and TIFF, depth maps, scans) -> 8-bit RGB by scaling, where
    PIL's convert("RGB") clips everything above 255 to white."""
    array = np.asarray(image, dtype=np.float64)
    if image.mode == "F" and array.max(initial=0.0) <= 1.0:
        array = array * 255.0  # float images in [0, 1]
    elif image.mode.startswith("I;16") or array.max(initial=0.0) > 255:
        array = array / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8)).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparent pixels are composited on white: dropping the alpha
    channel would show whatever colour they happen to store (often black)."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return _sixteen_bit_to_rgb(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")  # L, P, 1, CMYK, YCbCr, ...


def load_image(path: str) -> Image.Image:
    """An RGB image, upright. Larger than PIL's decompression-bomb limit
    (`PIL.Image.MAX_IMAGE_PIXELS`) is an `ImageError`, never a decoder eating all memory."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and width * height > limit:
                raise Image.DecompressionBombError(f"{width * height} pixels")
            image = ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
            return to_rgb(image)
    except Image.DecompressionBombError as e:
        raise image_too_large(path, e) from e


def image_too_large(path: str, error: Exception) -> ImageError:
    return ImageError(
        f"{path}: image too large ({error}); the decompression-bomb limit is "
        f"PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS} pixels. Resize it offline."
    )


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
        num_frames: int = 8,
    ):
        """`skip`: positions of records left out (the bad ones under --skip_bad_samples);
        `num_frames`: frames sampled from each video."""
        self.image_folder = image_folder
        self.num_frames = num_frames

        def tokenize(record):
            messages, _ = record_messages(record, image_folder, num_frames)
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
        self.records = tokenized.select(keep)
        self.num_dropped = len(tokenized) - len(keep)
        if sum(too_long):
            print(f"Dropped {sum(too_long)} of {len(tokenized)} records longer than max_length {max_length}.")
        if sum(fully_masked):
            # Never a sample that learns nothing: it would only dilute the loss.
            print(f"Dropped {sum(fully_masked)} of {len(tokenized)} records with no supervised token.")

    def __len__(self) -> int:
        return len(self.records)

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.records["input_ids"]]

    def multimodal(self) -> list[bool]:
        """Per sample: does it show images (or video frames)?"""
        return [bool(images) or bool(video) for images, video in zip(self.records["image"], self.records["video"],
                                                                     strict=True)]

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        example = {
            "input_ids": torch.tensor(record["input_ids"]),
            "labels": torch.tensor(record["labels"]),
        }
        example["images"] = [load_image(p) for p in media_paths(record, self.image_folder, self.num_frames)[0]]
        return example


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
