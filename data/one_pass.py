"""The one pass over the records: each is read (as a stream), checked, and tokenized by the same
code, so the check and what trains never disagree; what it makes is written as data/prepared.py's
arrays, and the check's report beside them.

Records go in chunks to worker processes (data/chunk_check.py: the Python of the chat template
and the checks runs on every free core; this process reads the file and writes the arrays). Then
every media file is decoded once (threads: decoding releases the GIL), and a released VLM's
images, by their sizes, give its samples' lengths.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from data import chunk_check
from data.chunk_check import (
    NO_LABELS,
    PassSettings,
    RecordRef,
    Row,
    checked_chunks,
    chunks,
    free_cores,
    too_long_reason,
)
from data.prepared import PreparedWriter
from data.problems import Problem, Report
from data.prompt import SampleTooLong, TemplateMismatch, check_fully_masked_share, fit_length
from data.record_check import check_media_files
from data.records import DataError, iter_records


class _Collected:
    """The main process's side of the pass: rows, in file order, into the report and the writer."""

    def __init__(self, data_path: str, writer, settings: PassSettings):
        self.report, self.writer, self.settings = Report(data_path), writer, settings
        self.first_seen: dict[str, str] = {}
        self.users: dict[str, list[RecordRef]] = {}  # media path -> the records using it
        self.record_problems: list[Problem] = []
        self.label_problems: list[Problem] = []
        self.template_error: Problem | None = None
        self.num_tokenized = self.num_fully_masked = 0
        self.released: list[tuple] = []  # a released VLM's, per sample: (ref, paths, image tokens, video)

    def add(self, row: Row) -> None:
        self.report.num_records += 1
        ref = row.ref
        if not row.read_error and ref.record_id in self.first_seen:
            duplicate = f"duplicate id, first at {self.first_seen[ref.record_id]}"
            self.record_problems.append(Problem.for_record(ref, "duplicate_id", duplicate))
        elif not row.read_error and ref.record_id is not None:
            self.first_seen[ref.record_id] = ref.location
        for path in row.paths:
            self.users.setdefault(path, []).append(ref)
        self.record_problems += [Problem.for_record(ref, kind, reason) for kind, reason in row.problems]
        if self.template_error or (row.sample is None and row.label_problem is None and row.template_error is None):
            return  # not tokenized; after a template error, tokenizing says nothing more
        if row.template_error:
            self.template_error = Problem(None, "file", None, "template", row.template_error)
            return
        if row.label_problem:
            self.label_problems.append(Problem.for_record(ref, *row.label_problem))
        if row.sample is None:
            return
        sample = row.sample
        self.num_tokenized += 1
        self.num_fully_masked += not sample.labelled
        self.writer.add(ref.position, sample.ids, sample.labels, len(sample.ids), sample.labelled, sample.multimodal,
                        sample.record_json)
        if self.settings.image_tokens:  # its length and fit wait for its images' sizes
            self.released.append((ref, row.paths, sample.image_tokens, sample.video))

    def file_problems(self) -> list[Problem]:
        problems = [self.template_error] if self.template_error else []
        try:
            check_fully_masked_share(self.num_fully_masked, self.num_tokenized)
        except TemplateMismatch as e:
            problems.append(Problem(None, "file", None, "template", str(e)))
        return problems


def _size(path: str) -> int:
    return os.path.getsize(path) if os.path.isfile(path) else 0  # a missing file: the report names it


def _progress_bar(data_path: str, show: bool):
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=_size(data_path), unit="B", unit_scale=True, desc="data pass", file=sys.stderr)


SMALL_FILE = 8 << 20  # bytes of records per worker process, at least (a pool costs seconds to start)


def run_pass(data_path: str, settings: PassSettings, folder: str, workers: int | None = None,
             show_progress: bool = True) -> Report:
    """Reads, checks and tokenizes every record of `data_path` and decodes every media file once;
    writes the samples and the report into `folder` (data/prepared.py) and returns the report."""
    if workers is None:  # a small file is done before a pool of workers has started
        workers = min(free_cores(), 1 + _size(data_path) // SMALL_FILE)
    writer = PreparedWriter(folder)
    collected = _Collected(data_path, writer, settings)
    bar, start = _progress_bar(data_path, show_progress), time.perf_counter()
    chunk_check.SETTINGS = settings  # before the fork: the workers inherit the tokenizer, never pickle it
    try:
        records = iter_records(data_path, progress=bar.update if bar else None)
        for rows in checked_chunks(chunks(records), workers):
            for row in rows:
                collected.add(row)
            if bar:
                bar.set_postfix(records=collected.report.num_records, refresh=False)
    except DataError as e:  # the file as a whole: no record counts, no sample is kept
        report = Report(data_path, 0, [Problem(None, "file", None, "unreadable_file", str(e))])
        writer.discard_samples()
        writer.finish(report)
        return report
    finally:
        chunk_check.SETTINGS = None
        if bar:
            bar.close()
    media_problems, sizes = check_media_files(collected.users, settings.num_frames, max(workers, 1),
                                              sizes=settings.image_tokens is not None)
    if settings.image_tokens:
        writer.flush()
        _finish_released(collected, sizes, settings)
    report = collected.report
    report.problems = (collected.record_problems + collected.label_problems + collected.file_problems()
                       + media_problems)
    report.problems.sort(key=lambda p: (p.position is not None, p.position or 0))
    writer.finish(report)
    if show_progress:
        seconds = time.perf_counter() - start
        print(f"data pass: {report.num_records} records, {len(writer)} samples in {seconds:.1f} s "
              f"({report.num_records / max(seconds, 1e-9):.0f} records/s, {workers} worker processes)")
    return report


def expand_images(input_ids: list[int], labels: list[int], image_token_index: int, counts: list[int]):
    """(input_ids, labels) with the k-th image token repeated `counts[k]` times: a released VLM's
    sample as its processor will expand it (each image one token before), for its length."""
    ids: list[int] = []
    out: list[int] = []
    images = iter(counts)
    for token, label in zip(input_ids, labels, strict=True):
        repeat = next(images, 1) if token == image_token_index else 1
        ids += [token] * repeat
        out += [label] * repeat
    return ids, out


def _finish_released(collected: _Collected, sizes: dict, settings: PassSettings) -> None:
    """A released VLM's samples as long as its processor makes them: each image as many tokens as
    the processor counts for its size (`ImageTokenCount`), the length the sampler groups by; a
    sample that cannot be cut to max_length without losing an image token or every answer is
    dropped, as the check says. The stored ids keep one token per image: the processor expands
    them per batch."""
    columns, counted = collected.writer.columns, {}
    ids_file = os.path.join(collected.writer.folder, "ids.bin")
    all_ids = np.fromfile(ids_file, dtype=np.int32) if os.path.getsize(ids_file) else np.zeros(0, np.int32)
    all_labels = np.fromfile(os.path.join(collected.writer.folder, "labels.bin"), dtype=np.int32)
    for k, (ref, paths, images, video) in enumerate(collected.released):
        found = tuple(sizes.get(p) for p in paths)
        known = found and all(found) and not video
        if known and found not in counted:
            counted[found] = settings.image_tokens(list(found))
        counts = counted[found] if known else None
        counts = counts if counts and images == len(counts) else None
        length = columns["lengths"][k] - (images - sum(counts) if counts else 0)
        labelled = columns["usable"][k]
        if length > settings.max_length:
            start, end = columns["offsets"][k], columns["offsets"][k + 1]
            ids, labels = all_ids[start:end].tolist(), all_labels[start:end].tolist()
            if counts:
                ids, labels = expand_images(ids, labels, settings.image_token_index, counts)
            try:
                fit_length(ids, labels, settings.image_token_index, settings.max_length)
            except SampleTooLong as e:
                collected.label_problems.append(Problem.for_record(ref, "too_long", too_long_reason(e)))
                collected.num_tokenized -= 1
                collected.num_fully_masked -= not labelled
                columns["usable"][k] = False
                continue
        if not labelled:
            collected.label_problems.append(Problem.for_record(ref, *NO_LABELS))
        columns["lengths"][k] = min(length, settings.max_length)
