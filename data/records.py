"""Reading LLaVA .json / .jsonl files record by record, without one bad record hiding the rest.

A malformed JSONL line or a record with non-UTF-8 bytes is one bad record (with its line
number), not an exception that stops the read: validation lists it, `--skip_bad_samples`
trains on the others. Only a .json file that does not parse at all is unreadable as a whole.
Files as Windows tools write them read the same: a UTF-8 byte-order mark, CRLF line ends.
Records in other projects' shapes (MiniCPM-V's) are read as LLaVA's here (`data/formats.py`),
so every later step sees one shape.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

from data.formats import as_llava_record
from errors import UserError


class DataError(UserError):
    """Data that cannot be trained on as it is. The message names the record and the fix."""


@dataclass
class RawRecord:
    position: int  # 0-based order in the file: the key of a skipped record
    location: str  # "line 12" (JSONL, 1-based) or "index 3" (JSON list, 0-based)
    record: dict | None  # None when `error` says why the record could not be read
    error: str | None = None
    # "malformed_json" | "not_a_record" | "non_utf8" | "bad_record" | "image_placeholder"
    error_kind: str | None = None

    @property
    def record_id(self) -> str | None:
        if self.record is None or self.record.get("id") is None:
            return None
        return str(self.record["id"])


def _bad_text(value) -> bool:
    """True when a string anywhere in `value` holds bytes that were not UTF-8 (read with
    surrogateescape they become lone surrogates, which cannot be encoded back)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_bad_text(k) or _bad_text(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_bad_text(v) for v in value)
    return False


def _checked(position: int, location: str, record) -> RawRecord:
    if not isinstance(record, dict):
        return RawRecord(position, location, None, f"not a JSON object but {type(record).__name__}", "not_a_record")
    if _bad_text(record):
        return RawRecord(
            position, location, record, "text that is not valid UTF-8; re-encode the file as UTF-8", "non_utf8"
        )
    record, problem = as_llava_record(record)
    if problem is not None:
        kind, reason = problem
        return RawRecord(position, location, record, reason, kind)
    return RawRecord(position, location, record)


def _is_jsonl(path: str, text: str) -> bool:
    if path.endswith(".jsonl"):
        return True
    return text.lstrip().startswith("{")  # a .json file holding one object per line


def iter_records(data_path: str) -> Iterator[RawRecord]:
    """Every record of the file, in order; a record that cannot be read carries its reason."""
    if not os.path.isfile(data_path):
        raise DataError(f"--data_path {data_path}: no such file.")
    with open(data_path, "rb") as f:
        # utf-8-sig: the byte-order mark Windows tools write is not part of the first record.
        text = f.read().decode("utf-8-sig", errors="surrogateescape")
    if _is_jsonl(data_path, text):
        position = 0
        # Lines end at "\n" only: str.splitlines also splits at a lone "\r" and at U+2028,
        # U+0085, ..., which JSON allows inside a string, and would make one record two bad lines.
        for number, line in enumerate(text.split("\n"), start=1):
            # CRLF line ends; a mark at any line's start is a file concatenated with its mark.
            line = line.removesuffix("\r").removeprefix("\ufeff")
            if not line.strip():
                continue
            location = f"line {number}"
            try:
                # strict=False: a raw control character (a stray "\r") inside a string is text.
                yield _checked(position, location, json.loads(line, strict=False))
            except json.JSONDecodeError as e:
                yield RawRecord(
                    position, location, None, f"malformed JSON ({e.msg} at column {e.colno})", "malformed_json"
                )
            position += 1
        return
    try:
        records = json.loads(text, strict=False)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{data_path}: malformed JSON at line {e.lineno}, column {e.colno} ({e.msg}); the "
            "whole file is one JSON list, so no record can be read. Fix that spot, or write the "
            "data as JSONL (one record per line), where a bad line costs only that record."
        ) from e
    if not isinstance(records, list):
        raise DataError(f"{data_path}: a .json data file holds a list of records, not {type(records).__name__}.")
    for index, record in enumerate(records):
        yield _checked(index, f"index {index}", record)
