"""Every record checked before step 1, so no run dies at step 40,000 on one corrupt JPEG or
trains silently on empty labels; and, in the same pass, every record tokenized for training.

    python scripts/check_data.py --data_path train.jsonl --image_folder images/   # the same pass

`prepare` runs data/one_pass.py once per file and settings: its samples and its report are
cached, memory-mapped (data/prepared.py), keyed by the file's content and every setting they
depend on, so a 600K-record file is read, checked and tokenized once and every rank maps the same
arrays. `check_training_data` is what training runs: it refuses to start on any bad record
unless `--skip_bad_samples true`, which trains on the rest and lists the skipped records in
OUTPUT_DIR/skipped_records.jsonl.
"""

from __future__ import annotations

import hashlib
import json
import os

from PIL import Image

from constants import NUM_FRAMES
from data.chunk_check import ImageTokenCounter, PassSettings
from data.one_pass import run_pass
from data.prepared import PreparedData, build_once, build_uncached
from data.problems import Report, write_skipped
from data.prompt import MAX_FULLY_MASKED_SHARE
from data.records import DataError

VERSION = 5  # part of the cache key: a change of the checks or of what is stored rebuilds every cache


def default_cache_dir() -> str:
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_home, "vlm-finetune", "data-check")


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tokenizer_fingerprint(tokenizer) -> list:
    """The tokenizer's name, size, chat template and, for a fast tokenizer, a hash of its whole
    definition (vocabulary, merges, added tokens, normalizer): an edited tokenizer under the same
    name is another key."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = hashlib.sha256(backend.to_str().encode()).hexdigest() if backend is not None else None
    return [tokenizer.name_or_path, len(tokenizer), tokenizer.chat_template, definition]


def cache_key(data_path: str, settings: PassSettings) -> str:
    """sha256 of the data file and of every setting the pass depends on. (Images edited in place
    after a pass are not seen: delete the cache folder to check again.)"""
    key = {
        "version": VERSION,
        "data": _file_sha256(data_path),
        "tokenizer": _tokenizer_fingerprint(settings.tokenizer),
        "image_tokens": [settings.num_image_tokens, settings.image_token_index,
                         getattr(settings.image_tokens, "settings", None)],
        "keep_records": settings.keep_records,
        "max_length": settings.max_length,
        "num_frames": settings.num_frames,
        "image_folder": os.path.abspath(settings.image_folder or "."),
        "max_image_pixels": Image.MAX_IMAGE_PIXELS,
        "max_fully_masked_share": MAX_FULLY_MASKED_SHARE,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def prepare(data_path: str, settings: PassSettings, cache_dir: str | None = None, workers: int | None = None,
            show_progress: bool = False) -> PreparedData:
    """The pass's samples and report for this file and settings: read from `cache_dir` when a
    complete pass is there, else made (by one process at a time) and stored there. Without
    `cache_dir` (or without the file, which the report then names) nothing is kept."""

    def build(folder: str) -> None:
        run_pass(data_path, settings, folder, workers, show_progress)

    if cache_dir is None or not os.path.isfile(data_path):
        return build_uncached(build)
    return build_once(cache_dir, cache_key(data_path, settings), build)


def validate_data_file(
    data_path: str,
    tokenizer,
    num_image_tokens: int,
    image_token_index: int,
    max_length: int,
    image_folder: str | None,
    num_workers: int | None = None,
    num_frames: int = NUM_FRAMES,
    image_tokens: ImageTokenCounter | None = None,
) -> Report:
    """Reads, checks and tokenizes every record and decodes every image (once), uncached; the
    report lists each problem with the record's position, line or index and id. `num_workers`:
    processes of the pass (default: every free core); `image_tokens`: a released VLM's tokens per
    image size, so that a sample is as long here as its processor makes it."""
    settings = PassSettings(tokenizer, num_image_tokens, image_token_index, max_length, image_folder, num_frames,
                            image_tokens)
    return prepare(data_path, settings, None, num_workers).report


def check_training_data(data_args, settings: PassSettings, output_dir: str | None = None,
                        show_progress: bool = True) -> tuple[PreparedData, set[int]]:
    """The pass training runs before step 1, cached in `--data_check_cache`: (its samples, the
    positions of the records to leave out). With `--validate_data true` (the default) it raises
    `DataError` when training must not start; `output_dir`: where skipped_records.jsonl goes (None
    on ranks that do not save). With `--validate_data false` nothing is refused: the records the
    pass could not make a sample of are left out."""
    cache_dir = data_args.data_check_cache or default_cache_dir()
    prepared = prepare(data_args.data_path, settings, cache_dir, show_progress=show_progress and bool(output_dir))
    report = prepared.report
    if not data_args.validate_data:
        return prepared, set()
    print(report.summary())
    for problem in report.of("warning")[:10]:
        print(f"  warning: {problem}")
    bad = report.of("fatal") or (report.of("error") and not data_args.skip_bad_samples)
    if bad or report.num_usable == 0:
        raise DataError(report.refusal())
    skipped = report.of("error", "dropped")
    if output_dir and skipped:
        os.makedirs(output_dir, exist_ok=True)
        write_skipped(os.path.join(output_dir, "skipped_records.jsonl"), skipped)
        print(f"Skipping {len(report.skip_positions())} records: {output_dir}/skipped_records.jsonl lists them.")
    return prepared, report.skip_positions()
