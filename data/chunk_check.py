"""The workers' side of the one pass (data/one_pass.py): a chunk of records checked and
tokenized (`check_chunk`), one chunk per worker process at a time, its texts in one tokenizer
call; the rows come back in file order.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from constants import IGNORE_INDEX
from data.prompt import (
    SampleTooLong,
    TemplateMismatch,
    llava_to_messages,
    tokenize_conversations,
)
from data.record_check import record_media_paths
from data.records import normalise_record

CHUNK = 256  # records a worker takes at a time: enough to amortize one tokenizer call and the pickling

# A released VLM's image expansion by image size: [(height, width)] -> tokens per image, or None
# where its processor does not say (`data.processor_prompt.ImageTokenCount`).
ImageTokenCounter = Callable[[list[tuple[int, int]]], list[int] | None]


@dataclass
class PassSettings:
    """What the pass's output depends on besides the file (all of it in the cache key)."""

    tokenizer: object  # renders the chat template and tokenizes (a released VLM's: ProcessorTemplate)
    num_image_tokens: int  # tokens per `<image>` in the stored ids (a released VLM's: 1)
    image_token_index: int
    max_length: int
    image_folder: str | None
    num_frames: int
    image_tokens: ImageTokenCounter | None = None  # a released VLM's count per image size
    keep_records: bool = False  # store each whole record (a released VLM's processor renders it per batch)


class RecordRef(NamedTuple):
    """What a problem names of its record (duck-types a RawRecord for `Problem.for_record`)."""

    position: int
    location: str
    record_id: str | None


class Sample(NamedTuple):
    """A tokenized record, as a worker hands it back."""

    ids: np.ndarray  # int32 [tokens]
    labels: np.ndarray  # int32 [tokens]
    labelled: bool  # has a supervised token
    image_tokens: int  # image-token ids in `ids` (a released VLM's: one per image)
    multimodal: bool
    video: bool
    record_json: bytes


NO_LABELS = ("no_labels", "no supervised token: the chat template renders no answer text")


def too_long_reason(error: SampleTooLong) -> str:
    return f"too long: {error} Dropped: cutting would lose image tokens or every answer."


class Row(NamedTuple):
    """One record's outcome in a worker."""

    ref: RecordRef
    read_error: bool  # the record could not be read as a record (its id is not checked for duplicates)
    problems: list  # (kind, reason): the record as read, its conversation and media paths
    label_problem: tuple | None  # (kind, reason) of tokenizing it: too_long, no_labels
    template_error: str | None  # the chat template cannot locate its answers (a file problem)
    paths: list[str]  # media files to decode
    sample: Sample | None




SETTINGS: PassSettings | None = None  # the workers' copy, inherited when they fork


def free_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _stored_record(raw, settings: PassSettings) -> tuple[bool, bytes]:
    """(shows media, the record as the dataset reads it back): its id and media names; the whole
    record where a processor renders it per batch."""
    record = normalise_record(raw)
    if not settings.keep_records:
        del record["conversations"]
    multimodal = bool(record["image"]) or bool(record["video"])
    return multimodal, json.dumps(record).encode("utf-8", errors="surrogateescape")


def _tokenized_row(raw, paths: list[str], result, settings: PassSettings) -> Row:
    ref = RecordRef(raw.position, raw.location, raw.record_id)
    if isinstance(result, TemplateMismatch):
        return Row(ref, False, [], None, f"{result} (first seen at {raw.location})", paths, None)
    if isinstance(result, SampleTooLong):
        return Row(ref, False, [], ("too_long", too_long_reason(result)), None, paths, None)
    ids, labels = (np.asarray(x, dtype=np.int32) for x in result)
    labelled = bool((labels != IGNORE_INDEX).any())
    # A released VLM's sample may yet be too long, which its check says instead (`_finish_released`).
    problem = None if labelled or settings.image_tokens else NO_LABELS
    multimodal, stored = _stored_record(raw, settings)
    sample = Sample(ids, labels, labelled, int((ids == settings.image_token_index).sum()), multimodal,
                    raw.record.get("video") is not None, stored)
    return Row(ref, False, [], problem, None, paths, sample)


def check_chunk(raws: list, settings: PassSettings | None = None) -> list[Row]:
    """Every record of the chunk checked, and those whose structure is sound tokenized (one call)."""
    settings = settings or SETTINGS
    rows: dict[int, Row] = {}
    to_tokenize = []  # (k, raw, paths, messages)
    for k, raw in enumerate(raws):
        ref = RecordRef(raw.position, raw.location, raw.record_id)
        if raw.error is not None:
            rows[k] = Row(ref, True, [(raw.error_kind, raw.error)], None, None, [], None)
            continue
        paths, frames, problems = record_media_paths(raw.record, settings.image_folder, settings.num_frames)
        if problems:
            rows[k] = Row(ref, False, problems, None, None, paths, None)
        else:
            to_tokenize.append((k, raw, paths, llava_to_messages(raw.record["conversations"], len(paths), frames)))
    # A released VLM's sample is cut only once its images' sizes are known (`finish_released`).
    max_length = None if settings.image_tokens else settings.max_length
    results = tokenize_conversations(settings.tokenizer, [t[3] for t in to_tokenize], settings.num_image_tokens,
                                     settings.image_token_index, max_length)
    for (k, raw, paths, _), result in zip(to_tokenize, results, strict=True):
        rows[k] = _tokenized_row(raw, paths, result, settings)
    return [rows[k] for k in range(len(raws))]


def chunks(records: Iterator, size: int = CHUNK) -> Iterator[list]:
    chunk = []
    for raw in records:
        chunk.append(raw)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def checked_chunks(chunks: Iterator[list], workers: int) -> Iterator[list[Row]]:
    """`check_chunk` of each chunk, in order, on `workers` forked processes; at most two chunks
    per worker in flight, so the file is read no faster than it is checked (bounded memory)."""
    if workers <= 1:
        yield from map(check_chunk, chunks)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pending = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(check_chunk, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
