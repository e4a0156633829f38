"""The prompt builder for a released VLM: its own chat template and processor, which expand each
image into the family's tokens (fixed counts, tiles, dynamic-resolution grids), with the label
rule of data/prompt.py: exactly the assistant tokens are supervised, never an image token.

Training, inference and evaluation of a released VLM build their inputs here, as a composed
base's do in data/prompt.py; the supervised pieces come from the same `split_supervised`.

The processor tokenizes the expanded text, so where each assistant piece landed is found by
aligning its ids with the tokenizer's ids of the unexpanded text (whose character offsets say
which tokens are supervised): the expansion only inserts tokens, at the image placeholders.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from PIL import Image
from transformers import ProcessorMixin

from constants import IGNORE_INDEX, NUM_FRAMES
from data.dataset import SupervisedDataset, record_messages
from data.media import load_record_media
from data.prepared import PreparedData
from data.prompt import (
    IMAGE_MARKER,
    SampleTooLong,
    TemplateMismatch,
    split_supervised,
    tokenize_conversation,
)
from data.records import DataError
from patches import processor_image_tokens

# Inputs of one token per position: cut with input_ids. Everything else the processor returns
# (pixel_values, grid sizes, image masks) is per image, batched the family's own way.
SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


def content_parts(content: str) -> list[dict]:
    """"<image>\\nWhat is it?" -> [{"type": "image"}, {"type": "text", "text": "\\nWhat is it?"}]: the
    form multimodal chat templates render each image placeholder from."""
    parts: list[dict] = []
    for k, text in enumerate(content.split(IMAGE_MARKER)):
        if k:
            parts.append({"type": "image"})
        if text:
            parts.append({"type": "text", "text": text})
    return parts


class ProcessorTemplate:
    """A released VLM's processor seen as a tokenizer: its chat template (content as typed parts)
    for `split_supervised`, its tokenizer for the rest. The data check reads a record through it
    as through a composed base's tokenizer."""

    def __init__(self, processor):
        self.processor = processor
        self.chat_template = processor.chat_template

    def __call__(self, *args, **kwargs):
        return self.processor.tokenizer(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.processor.tokenizer)

    def __getattr__(self, name):  # pad_token_id, eos_token_id, decode, ...
        return getattr(self.processor.tokenizer, name)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False) -> str:
        conversation = [{"role": m["role"], "content": content_parts(m["content"])} for m in messages]
        return self.processor.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt
        )


def as_template(tokenizer_or_processor):
    """What `split_supervised` reads: a composed base's tokenizer as it is, a released VLM's
    processor as a `ProcessorTemplate` (as run.predict takes either, in the `tokenizer` slot)."""
    if isinstance(tokenizer_or_processor, ProcessorMixin):
        return ProcessorTemplate(tokenizer_or_processor)
    return tokenizer_or_processor


def align_labels(expanded: list[int], reference: list[int], supervised: list[bool]) -> list[int]:
    """Labels for the processor's ids: a token of the unexpanded text keeps its label where it
    reappears, in order; the tokens the expansion inserted are never supervised."""
    labels, j = [IGNORE_INDEX] * len(expanded), 0
    for i, token in enumerate(expanded):
        if j < len(reference) and token == reference[j]:
            labels[i] = token if supervised[j] else IGNORE_INDEX
            j += 1
    if j != len(reference):
        raise TemplateMismatch(
            f"The processor's ids do not contain the text's own {len(reference)} tokens in order "
            f"(matched {j}): it changes the text beyond expanding image placeholders, so the "
            "assistant tokens cannot be located."
        )
    return labels


def render(processor, messages: list[dict], add_generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as the chat template renders it, and the character spans of its
    supervised pieces (each assistant turn's answer and end-of-turn)."""
    pieces = split_supervised(ProcessorTemplate(processor), messages, add_generation_prompt)
    spans, start = [], 0
    for piece, supervised in pieces:
        if supervised:
            spans.append((start, start + len(piece)))
        start += len(piece)
    return "".join(piece for piece, _ in pieces), spans


def encode_batch(processor, conversations: list[tuple[list[dict], list]], max_length: int | None = None,
                 add_generation_prompt: bool = False, prefix_lm: bool = False) -> dict[str, torch.Tensor]:
    """(messages, images) pairs -> the model's batch, made by one processor call so that each
    family batches its images its own way; rows padded on the right for training, on the left
    for generation (`add_generation_prompt`: prompts awaiting answers, no labels). Messages hold
    content strings with `<image>` markers, one per image, in order. `prefix_lm`: the model reads
    `token_type_ids` as its bidirectional prefix (PaliGemma)."""
    rendered = [render(processor, messages, add_generation_prompt) for messages, _ in conversations]
    images = [list(images) for _, images in conversations]
    batch = processor(
        text=[text for text, _ in rendered], images=images if any(images) else None, padding=True,
        padding_side="left" if add_generation_prompt else "right", return_tensors="pt", add_special_tokens=False,
    )
    batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and k != "labels"}  # ours, below
    if add_generation_prompt:
        return batch
    labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    for row, (text, spans) in enumerate(rendered):
        length = int(batch["attention_mask"][row].sum())
        reference = processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        supervised = [b > a and any(s <= a and b <= e for s, e in spans) for a, b in reference["offset_mapping"]]
        ids = batch["input_ids"][row, :length].tolist()
        labels[row, :length] = torch.tensor(align_labels(ids, reference["input_ids"], supervised))
    image_token = getattr(processor, "image_token_id", None)
    if image_token is not None:
        labels[batch["input_ids"] == image_token] = IGNORE_INDEX
    batch["labels"] = labels
    if prefix_lm and "token_type_ids" in batch:
        mark_answers_causal(batch)
    return _fit(batch, max_length, image_token)


def mark_answers_causal(batch: dict) -> None:
    """A prefix-LM family (PaliGemma) attends bidirectionally over `token_type_ids == 0`, which its
    processor returns for the whole text: the answers would see themselves. From each row's
    first supervised token on, the text is suffix (1), attended causally, as its processor's
    `suffix=` marks it."""
    labelled = batch["labels"] != IGNORE_INDEX  # [B, L]
    batch["token_type_ids"] = (labelled.cumsum(dim=1) > 0).to(batch["token_type_ids"].dtype)


def _fit(batch: dict, max_length: int | None, image_token: int | None) -> dict:
    """Cut the columns past `max_length` if every image token and a label of every row survive."""
    if max_length is None or batch["input_ids"].shape[1] <= max_length:
        return batch
    images_cut = image_token is not None and bool((batch["input_ids"][:, max_length:] == image_token).any())
    if images_cut or bool((batch["labels"][:, :max_length] == IGNORE_INDEX).all(dim=1).any()):
        raise SampleTooLong(
            f"{int(batch['attention_mask'].sum(1).max())} tokens (image tokens included) > --max_length {max_length}."
        )
    return {k: v[:, :max_length] if k in SEQUENCE_KEYS or k == "labels" else v for k, v in batch.items()}


class ImageTokenCount:
    """How many tokens the processor expands each image into, by the image's size alone, with
    the processor's own settings (its pixel budget, its tiles): the data check's length of a
    released VLM's sample before step 1. None where the processor does not say (SmolVLM's and
    MiniCPM-V 4.6's): there each image counts as one token, and a batch that will not fit stops
    at collation, naming its records.

    Some processors also add tokens of their own to a sample (PaliGemma: a BOS after the image
    and a newline after the prompt): measured once on a probe sample, and counted with the first
    image, so that a sample is exactly as long here as the processor makes it."""

    def __init__(self, processor):
        self.processor = processor
        self.settings = processor.image_processor.to_json_string()  # in the data check's cache key
        self.per_sample = self._added_by_processor()

    def __call__(self, sizes: list[tuple[int, int]]) -> list[int] | None:
        counts = processor_image_tokens(self.processor, sizes)
        return counts and [counts[0] + self.per_sample, *counts[1:]]

    def _added_by_processor(self) -> int:
        size = 64
        counts = processor_image_tokens(self.processor, [(size, size)])
        if counts is None or not self.processor.chat_template:
            return 0
        messages = [{"role": "user", "content": IMAGE_MARKER + "\nWhat is it?"}, {"role": "assistant", "content": "It is."}]
        ids, _ = tokenize_conversation(ProcessorTemplate(self.processor), messages, 1, self.processor.image_token_id)
        made = encode_batch(self.processor, [(messages, [Image.new("RGB", (size, size))])])
        return made["input_ids"].shape[1] - (len(ids) - 1 + counts[0])


class ProcessorDataset(SupervisedDataset):
    """A released VLM's samples of the one pass (its stored text tokens and, counted from each
    image's size, its image tokens: `lengths()` for the sampler) as (messages, images) pairs:
    `ProcessorCollator` makes a batch of them with the model's processor, which expands the images."""

    def __init__(self, prepared: PreparedData, image_folder: str | None, processor, skip: Collection[int] = (),
                 num_frames: int = NUM_FRAMES):
        super().__init__(prepared, image_folder, skip, num_frames)
        self.processor = processor
        refuse_text_only_if_images_needed(processor, self)

    def __getitem__(self, i: int) -> dict:
        record = self.record(i)
        return {
            "id": record["id"],
            "messages": record_messages(record, self.image_folder, self.num_frames),
            "images": load_record_media(record, self.image_folder, self.num_frames),
        }


def refuse_text_only_if_images_needed(processor, dataset: SupervisedDataset) -> None:
    """Some processors (PaliGemma's) refuse a sample without an image: say so before step 1,
    naming the records, rather than as the processor's error in the first batch that has one."""
    text_only = [i for i, shows in enumerate(dataset.multimodal()) if not shows]
    if not text_only:
        return
    try:
        processor(text=["a"], return_tensors="pt")
    except ValueError as error:
        ids = [dataset.record(i)["id"] for i in text_only[:10]]
        raise DataError(
            f"{len(text_only)} records have no image (ids {ids}), but this model's processor "
            f"takes none without one ({error}). Give each record an image, or leave these out of the data."
        ) from None


class ProcessorCollator:
    """A batch of `ProcessorDataset` samples through `encode_batch`, in the DataLoader's workers."""

    def __init__(self, processor, max_length: int | None, prefix_lm: bool = False):
        self.processor, self.max_length, self.prefix_lm = processor, max_length, prefix_lm

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        conversations = [(s["messages"], s["images"]) for s in samples]
        try:
            return encode_batch(self.processor, conversations, self.max_length, prefix_lm=self.prefix_lm)
        except SampleTooLong as error:
            ids = [s["id"] for s in samples]
            raise SampleTooLong(f"a batch of records {ids}: {error} Raise --max_length, or lower --max_pixels.") from error
