"""What the one pass over the records leaves on disk (data/one_pass.py), and how every rank reads
it: flat arrays, memory-mapped, so N ranks of a node share one copy in the page cache and a
sample is a slice.

A folder of the cache holds, per sample (a record that reached tokenization, in file order):
    ids.bin, labels.bin   int32, every sample's tokens one after the other
    offsets.npy           int64 [samples + 1]: sample k is ids[offsets[k]:offsets[k + 1]]
    positions.npy         int64 [samples]: the record's position in the file (the skip key)
    lengths.npy           int64 [samples]: tokens as training sees them, image tokens counted
    usable.npy            bool [samples]: tokenized, fits max_length, has a supervised token
    multimodal.npy        bool [samples]: shows images or video frames
    blob.bin, blob_offsets.npy   UTF-8 JSON of each sample's record (media names; a released
                          VLM's whole record, for its processor), read when the sample is
    report.json           the data check's report of the file
    COMPLETE              written last
It is built in `<key>.partial-<pid>` and renamed to `<key>` when complete (atomic): a pass cut
off mid-write is never read, and the next run builds again. One process per node builds, under
an exclusive lock on `<key>.lock`, while the others wait for it.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable

import numpy as np

from data.problems import Report

COMPLETE = "COMPLETE"
ARRAYS = {"offsets": np.int64, "positions": np.int64, "lengths": np.int64, "usable": np.bool_,
          "multimodal": np.bool_, "blob_offsets": np.int64}


class PreparedWriter:
    """Appends samples to a folder's files as the pass makes them; `finish` writes the rest.
    `lengths` and `usable` stay editable until then (a released VLM's are known only once its
    images' sizes are)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.ids = open(os.path.join(folder, "ids.bin"), "wb")  # noqa: SIM115 - closed in finish
        self.labels = open(os.path.join(folder, "labels.bin"), "wb")  # noqa: SIM115
        self.blob = open(os.path.join(folder, "blob.bin"), "wb")  # noqa: SIM115
        self.columns: dict[str, list] = {name: [0] if name.endswith("offsets") else [] for name in ARRAYS}

    def __len__(self) -> int:
        return len(self.columns["positions"])

    def add(self, position: int, ids: np.ndarray, labels: np.ndarray, length: int, usable: bool,
            multimodal: bool, record_json: bytes) -> None:
        self.ids.write(ids.astype(np.int32, copy=False).tobytes())
        self.labels.write(labels.astype(np.int32, copy=False).tobytes())
        self.blob.write(record_json)
        c = self.columns
        c["offsets"].append(c["offsets"][-1] + len(ids))
        c["blob_offsets"].append(c["blob_offsets"][-1] + len(record_json))
        c["positions"].append(position)
        c["lengths"].append(length)
        c["usable"].append(usable)
        c["multimodal"].append(multimodal)

    def discard_samples(self) -> None:
        for f in (self.ids, self.labels, self.blob):
            f.seek(0)
            f.truncate()
        self.columns = {name: [0] if name.endswith("offsets") else [] for name in ARRAYS}

    def flush(self) -> None:
        for f in (self.ids, self.labels, self.blob):
            f.flush()

    def finish(self, report: Report) -> None:
        for f in (self.ids, self.labels, self.blob):
            f.close()
        for name, dtype in ARRAYS.items():
            np.save(os.path.join(self.folder, f"{name}.npy"), np.asarray(self.columns[name], dtype=dtype))
        with open(os.path.join(self.folder, "report.json"), "w") as f:
            json.dump(report.to_json(), f)
        with open(os.path.join(self.folder, COMPLETE), "w") as f:
            f.write("complete\n")


def _flat(path: str) -> np.ndarray:
    """An int32 file memory-mapped (np.memmap refuses an empty file)."""
    if os.path.getsize(path) == 0:
        return np.zeros(0, dtype=np.int32)
    return np.memmap(path, dtype=np.int32, mode="r")


class PreparedData:
    """A complete cache folder, memory-mapped: nothing is read until a sample is."""

    def __init__(self, folder: str):
        self.folder = folder
        for name in ARRAYS:
            setattr(self, name, np.load(os.path.join(folder, f"{name}.npy"), mmap_mode="r"))
        self.ids, self.labels = _flat(os.path.join(folder, "ids.bin")), _flat(os.path.join(folder, "labels.bin"))
        blob = os.path.join(folder, "blob.bin")
        self.blob = np.memmap(blob, dtype=np.uint8, mode="r") if os.path.getsize(blob) else b""
        with open(os.path.join(folder, "report.json")) as f:
            self.report = Report.from_json(json.load(f))

    def __len__(self) -> int:
        return len(self.positions)

    def tokens(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) of sample k, views of the mapped files."""
        start, end = self.offsets[k], self.offsets[k + 1]
        return self.ids[start:end], self.labels[start:end]

    def record(self, k: int) -> dict:
        """Sample k's record as the pass normalised it (data.dataset.normalise_record)."""
        return json.loads(bytes(self.blob[self.blob_offsets[k] : self.blob_offsets[k + 1]]))

    def selection(self, skip) -> np.ndarray:
        """Indices of the samples that train: usable, and not at a skipped position."""
        keep = np.asarray(self.usable, dtype=bool).copy()
        if skip:
            keep &= ~np.isin(self.positions, np.fromiter(skip, dtype=np.int64))
        return np.flatnonzero(keep)


def is_complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, COMPLETE))


def build_once(cache_dir: str, key: str, build: Callable[[str], None]) -> PreparedData:
    """The cache folder `cache_dir/key`, built by `build(folder)` if no complete one exists. Under
    an exclusive file lock: of the processes asking at once, one builds and the others wait,
    then read what it built."""
    final = os.path.join(cache_dir, key)
    if not is_complete(final):
        os.makedirs(cache_dir, exist_ok=True)
        with open(final + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
            if not is_complete(final):
                for stale in glob.glob(glob.escape(final) + ".partial-*"):  # a builder that was killed
                    shutil.rmtree(stale, ignore_errors=True)
                partial = f"{final}.partial-{os.getpid()}"
                os.makedirs(partial)
                build(partial)
                shutil.rmtree(final, ignore_errors=True)  # a folder without its marker: never complete
                os.rename(partial, final)
    return PreparedData(final)


def build_uncached(build: Callable[[str], None]) -> PreparedData:
    """Built in a temporary folder that is gone once mapped (the mapped files live on until the
    arrays do): scripts/check_data.py and tests, where nothing is kept."""
    folder = tempfile.mkdtemp(prefix="vlm-data-")
    try:
        build(folder)
        return PreparedData(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
