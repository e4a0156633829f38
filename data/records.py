"""Reading LLaVA .json / .jsonl files record by record, without one bad record hiding the rest.

A malformed JSONL line or a record with non-UTF-8 bytes is one bad record (with its line
number), not an exception that stops the read: validation lists it, `--skip_bad_samples`
trains on the others. Only a .json file that does not parse at all is unreadable as a whole.
Files as Windows tools write them read the same: a UTF-8 byte-order mark, CRLF line ends.
Records in other projects' shapes (MiniCPM-V's) are read as LLaVA's here (`data/formats.py`),
so every later step sees one shape.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Callable, Iterator
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


def normalise_record(raw: RawRecord) -> dict:
    """One record as {"id": str, "image": [names], "video": name | None, "conversations":
    [{"from", "value"}]}: ids may be numbers, "image" a name or a list, and extra keys anything;
    the loaders need one shape. Validation (data/record_check.py) says in detail what is wrong with
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


BLOCK = 1 << 20  # bytes read at a time: a 1 GB file is never in memory whole


def _decoder():
    # utf-8-sig: the byte-order mark Windows tools write is not part of the first record;
    # surrogateescape: a non-UTF-8 byte stays in the text, where `_bad_text` finds its record.
    return codecs.getincrementaldecoder("utf-8-sig")(errors="surrogateescape")


def iter_records(data_path: str, progress: Callable[[int], None] | None = None) -> Iterator[RawRecord]:
    """Every record of the file, in order, read as a stream (a block at a time, each record
    parsed alone); a record that cannot be read carries its reason. `progress(n)`: called with
    the bytes of each block or line read."""
    if not os.path.isfile(data_path):
        raise DataError(f"--data_path {data_path}: no such file.")
    with open(data_path, "rb") as f:
        first = _decoder().decode(f.read(BLOCK)).lstrip()
        f.seek(0)
        if data_path.endswith(".jsonl") or first.startswith("{"):  # a .json file of one object per line
            yield from _jsonl_records(f, progress)
            return
        reader = _ListReader(data_path, _blocks(f, progress))
        if not first.startswith("["):
            reader.refuse_whole_file()
        yield from reader.records()


def _blocks(f, progress) -> Iterator[str]:
    decoder = _decoder()
    while block := f.read(BLOCK):
        if progress:
            progress(len(block))
        yield decoder.decode(block)
    yield decoder.decode(b"", final=True)


def _jsonl_records(f, progress) -> Iterator[RawRecord]:
    position = 0
    # Lines end at "\n" only (a binary file's lines): str.splitlines also splits at a lone "\r"
    # and at U+2028, U+0085, ..., which JSON allows inside a string: one record, two bad lines.
    for number, raw_line in enumerate(f, start=1):
        if progress:
            progress(len(raw_line))
        # CRLF line ends; a mark at any line's start is a file concatenated with its mark.
        line = raw_line.decode("utf-8", errors="surrogateescape").removesuffix("\n").removesuffix("\r")
        if number == 1:
            line = line.removeprefix("\ufeff")  # the file's own mark, as utf-8-sig reads it
        line = line.removeprefix("\ufeff")
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


_NOT_SPACE = re.compile(r"[^ \t\n\r]")
_JSON = json.JSONDecoder(strict=False)  # strict=False: a raw control character in a string is text


class _ListReader:
    """The records of a JSON list, parsed one at a time (`json.JSONDecoder.raw_decode`) from a
    buffer of the text read so far; the text of records already read is dropped."""

    def __init__(self, data_path: str, blocks: Iterator[str]):
        self.data_path, self.blocks, self.buffer = data_path, blocks, ""
        self.lines_before = self.column_before = 0  # where `buffer` starts in the file

    def _more(self) -> bool:
        block = next(self.blocks, None)
        self.buffer += block or ""
        return block is not None

    def _skip_space(self, at: int) -> int:
        """The first non-blank character at or after `at`, reading on as needed."""
        while True:
            match = _NOT_SPACE.search(self.buffer, at)
            if match:
                return match.start()
            if not self._more():
                return len(self.buffer)

    def _drop(self, at: int) -> None:
        dropped = self.buffer[:at]
        newlines = dropped.count("\n")
        self.column_before = len(dropped) - dropped.rfind("\n") - 1 if newlines else self.column_before + at
        self.lines_before += newlines
        self.buffer = self.buffer[at:]

    def _decode(self, at: int):
        """(the value at `at`, where it ends); a value cut at the buffer's end is read on."""
        while True:
            try:
                value, end = _JSON.raw_decode(self.buffer, at)
                if end < len(self.buffer) or not self._more():
                    return value, end
            except json.JSONDecodeError as e:
                if not self._more():
                    raise self._malformed(e.pos, e.msg) from e

    def records(self) -> Iterator[RawRecord]:
        at, index = self._skip_space(self._skip_space(0) + 1), 0  # past "["
        if self.buffer.startswith("]", at):
            return self._end(at + 1)
        while True:
            value, end = self._decode(at)
            yield _checked(index, f"index {index}", value)
            index += 1
            at = self._skip_space(end)
            if self.buffer.startswith("]", at):
                return self._end(at + 1)
            if not self.buffer.startswith(",", at):
                raise self._malformed(at, "Expecting ',' delimiter")
            at = self._skip_space(at + 1)
            if at > BLOCK:
                self._drop(at)
                at = 0

    def _end(self, at: int) -> None:
        at = self._skip_space(at)
        if at < len(self.buffer):
            raise self._malformed(at, "Extra data")

    def _malformed(self, at: int, message: str) -> DataError:
        line = self.buffer.count("\n", 0, at)
        column = at - self.buffer.rfind("\n", 0, at) if line else self.column_before + at + 1
        return DataError(
            f"{self.data_path}: malformed JSON at line {self.lines_before + line + 1}, column {column} "
            f"({message}); the whole file is one JSON list, so no record can be read. Fix that spot, or "
            "write the data as JSONL (one record per line), where a bad line costs only that record."
        )

    def refuse_whole_file(self) -> None:
        """A .json file that is neither a list nor objects one per line: parsed whole to say what it is."""
        text = "".join(self.blocks)
        try:
            value = json.loads(text, strict=False)
        except json.JSONDecodeError as e:
            self.buffer = text
            raise self._malformed(e.pos, e.msg) from e
        raise DataError(f"{self.data_path}: a .json data file holds a list of records, not {type(value).__name__}.")
