"""Hugging Face datasets in the `messages` format (TRL / transformers) -> LLaVA records, in one
place, so validation, the prompt builder, training and evaluation each keep a single path.

    {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
                  {"role": "assistant", "content": "red"}],
     "images": [PIL.Image or "rel/path.png", ...]}

A turn's content is a string or a list of typed parts; each `{"type": "image"}` part becomes
`<image>\\n` (LLaVA's marker), text parts are joined as they come. Images given as PIL images (a
`datasets.Image` column) are written once as PNG files beside the converted JSONL; images given
as paths stay names under `--image_folder`. The converted file is what every later step reads:
its line N is the dataset's row N-1.
"""

from __future__ import annotations

import io
import json
import os

import datasets
from PIL import Image

from data.prompt import IMAGE_MARKER
from data.records import DataError, iter_records
from patches import dataset_fingerprint


def is_messages_file(path: str) -> bool:
    """A .parquet file, or a .json/.jsonl file whose first record has `messages`."""
    if path.endswith(".parquet"):
        return True
    first = next(iter_records(path), None)
    return first is not None and isinstance(first.record, dict) and "messages" in first.record


def load_messages_dataset(name: str, split: str = "train") -> datasets.Dataset:
    """A folder from `Dataset.save_to_disk`, a .json/.jsonl/.parquet file, or anything
    `datasets.load_dataset` takes (a hub id, a local dataset folder)."""
    if os.path.isdir(name) and os.path.isfile(os.path.join(name, "state.json")):
        return datasets.load_from_disk(name)
    if os.path.isdir(name) and os.path.isfile(os.path.join(name, "dataset_dict.json")):
        return datasets.load_from_disk(name)[split]  # a DatasetDict's split
    if os.path.isfile(name):
        builder = "parquet" if name.endswith(".parquet") else "json"
        return datasets.load_dataset(builder, data_files=name, split="train")
    return datasets.load_dataset(name, split=split)


def content_text(content, where: str) -> str:
    """A turn's content (string or typed parts) as text with `<image>` markers."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise DataError(f"{where}: content is neither a string nor a list of parts.")
    text = ""
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            text += IMAGE_MARKER + "\n"
        elif kind == "text":
            text += part.get("text") or ""
        else:
            raise DataError(f"{where}: content part {part!r} is not {{'type': 'image' | 'text'}}.")
    return text


def saved_images(images: list, index: int, image_dir: str) -> list[str]:
    """Row `index`'s images as names under `image_dir`: PIL images (and undecoded datasets.Image
    values) written there as PNG files, paths kept as they are."""
    names = []
    for k, image in enumerate(images):
        if isinstance(image, dict):  # an undecoded datasets.Image: {"bytes", "path"}
            image = image["path"] if image.get("bytes") is None else Image.open(io.BytesIO(image["bytes"]))
        if isinstance(image, Image.Image):
            name = f"images/{index:08d}-{k}.png"
            image.save(os.path.join(image_dir, name))
            image = name
        names.append(str(image))
    return names


def to_llava_record(row: dict, index: int, image_dir: str) -> dict:
    """One messages-format row -> a LLaVA record; PIL images are saved under `image_dir`."""
    where = f"row {index}"
    messages = row.get("messages")
    if not isinstance(messages, list):
        raise DataError(f"{where}: no 'messages' list.")
    conversations = [
        {"from": str(m.get("role")), "value": content_text(m.get("content"), f"{where}, turn {k}")}
        for k, m in enumerate(messages)
    ]
    names = saved_images(row.get("images") or [], index, image_dir)
    record = {"id": str(row.get("id", index)), "conversations": conversations}
    if names:
        record["image"] = names
    return record


def convert_messages_dataset(dataset: datasets.Dataset, out_dir: str) -> str:
    """Writes `out_dir/<fingerprint>/records.jsonl` (and its images beside it, under images/)
    once; returns its path. Keyed by the dataset's fingerprint: a changed dataset is converted
    again, and a training set and an evaluation set never share an image name."""
    folder = os.path.join(out_dir, dataset_fingerprint(dataset))
    path = os.path.join(folder, "records.jsonl")
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for index, row in enumerate(dataset):
            f.write(json.dumps(to_llava_record(row, index, folder)) + "\n")
    os.replace(path + ".tmp", path)  # atomic: another rank never reads half a file
    return path


def holds_images(dataset: datasets.Dataset) -> bool:
    """True when the `images` column holds images (datasets.Image), not path strings."""
    feature = dataset.features.get("images")
    return isinstance(getattr(feature, "feature", None), datasets.Image)


def is_llava_file(source: str) -> bool:
    """A LLaVA .json/.jsonl file; a missing one too (its reader then names it), rather than a
    hub id that datasets would try to download."""
    if not os.path.exists(source):
        return source.endswith((".json", ".jsonl"))
    return os.path.isfile(source) and not is_messages_file(source)


def as_llava_file(source: str, image_folder: str | None, out_dir: str, split: str = "train") -> tuple[str, str | None]:
    """(a LLaVA .json/.jsonl file, its image folder) for `source`: a LLaVA file as it is; a
    messages-format dataset (a file, a save_to_disk folder, a hub id) as its conversion under
    `out_dir/messages_data/`, with the converted images' folder when it holds images."""
    if is_llava_file(source):
        return source, image_folder
    return _convert(source, image_folder, out_dir, split)


def _convert(source: str, image_folder: str | None, out_dir: str, split: str) -> tuple[str, str | None]:
    dataset = load_messages_dataset(source, split)
    path = convert_messages_dataset(dataset, os.path.join(out_dir, "messages_data"))
    return path, os.path.dirname(path) if holds_images(dataset) else image_folder


def use_messages_dataset(data_args, out_dir: str) -> None:
    """Training and held-out data in the messages format (`--dataset_name`, or a `--data_path` /
    `--eval_data_path` holding it) -> their LLaVA conversions: `data_path` / `eval_data_path`
    point at them, `image_folder` / `eval_image_folder` at the converted images when the dataset
    holds images rather than paths."""
    image_folder = data_args.image_folder  # the folder given, before a conversion replaces it
    source = data_args.dataset_name or data_args.data_path
    # is_llava_file reads the file's first record (all of a .json file): once, not twice.
    if data_args.dataset_name or (source and not is_llava_file(source)):
        data_args.data_path, data_args.image_folder = _convert(
            source, data_args.image_folder, out_dir, data_args.dataset_split
        )
    if data_args.eval_data_path:
        data_args.eval_data_path, data_args.eval_image_folder = as_llava_file(
            data_args.eval_data_path, data_args.eval_image_folder or image_folder, out_dir,
            data_args.eval_dataset_split,
        )
