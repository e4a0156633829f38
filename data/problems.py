"""What the data check finds: each problem of a record or of the file (`Problem`, its kind's
severity in `SEVERITY`), and the whole file's `Report`, which says whether training may start,
which records it leaves out, and how to fix the rest."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass, field

# What each kind of problem does: "fatal" stops training whatever the flags (the file or the
# template is wrong, not a record); "error" stops it unless --skip_bad_samples; "dropped" is
# always left out and counted (too long); "warning" is reported and trained on.
SEVERITY = {
    "unreadable_file": "fatal",
    "template": "fatal",
    "malformed_json": "error",
    "not_a_record": "error",
    "non_utf8": "error",
    "bad_record": "error",
    "image_placeholder": "error",
    "roles": "error",
    "ends_on_human": "error",
    "empty_answer": "error",
    "image_marker": "error",
    "image_path": "error",
    "missing_image": "error",
    "bad_video": "error",
    "empty_image": "error",
    "corrupt_image": "error",
    "huge_image": "error",
    "no_labels": "error",
    "too_long": "dropped",
    "duplicate_id": "warning",
}

# When no record at all is usable, the setup is more likely wrong than every record: the most
# common problem says which part of it to look at.
NOTHING_USABLE_HINTS = {
    "missing_image": "is --image_folder the folder the image paths are relative to?",
    "image_path": "do the image paths lie inside --image_folder?",
    "malformed_json": "is --data_path a .json list of records or a .jsonl file, one record per line?",
    "not_a_record": "is --data_path a .json list of records or a .jsonl file, one record per line?",
    "bad_record": "are the records LLaVA's ('conversations' of 'from'/'value' turns) or MiniCPM-V's "
                  "('role'/'content' turns)?",
    "too_long": "does --max_length leave room for the image tokens and the text?",
}


@dataclass
class Problem:
    position: int | None  # the record's position in the file; None: the file as a whole
    location: str  # "line 12" (JSONL) / "index 3" (JSON) / "file"
    record_id: str | None
    kind: str  # a key of SEVERITY
    reason: str

    @property
    def severity(self) -> str:
        return SEVERITY[self.kind]

    @classmethod
    def for_record(cls, raw, kind: str, reason: str) -> Problem:
        """A problem of the record `raw` (a RawRecord)."""
        return cls(raw.position, raw.location, raw.record_id, kind, reason)

    def __str__(self) -> str:
        record = f" (id {self.record_id})" if self.record_id is not None else ""
        return f"{self.location}{record}: {self.reason}"


@dataclass
class Report:
    data_path: str
    num_records: int = 0
    problems: list[Problem] = field(default_factory=list)

    def of(self, *severities: str) -> list[Problem]:
        return [p for p in self.problems if p.severity in severities]

    @property
    def refuses_training(self) -> bool:
        """True when training does not start by default (the exit status of check_data.py)."""
        return bool(self.of("fatal", "error"))

    def skip_positions(self) -> set[int]:
        """Records left out of training: the bad ones (under --skip_bad_samples) and too long."""
        return {p.position for p in self.of("error", "dropped") if p.position is not None}

    @property
    def num_usable(self) -> int:
        """Records that train under --skip_bad_samples."""
        return self.num_records - len(self.skip_positions())

    def summary(self) -> str:
        bad = {p.position for p in self.of("error")}
        dropped = {p.position for p in self.of("dropped")} - bad
        kinds = Counter(p.kind for p in self.problems)
        lines = [
            f"{self.data_path}: {self.num_records} records, {len(bad)} bad, "
            f"{len(dropped)} too long (dropped), {len(self.of('warning'))} warnings."
        ]
        lines += [f"  {kind}: {count} ({SEVERITY[kind]})" for kind, count in sorted(kinds.items())]
        lines += [f"  {p}" for p in self.of("fatal")]
        return "\n".join(lines)

    def refusal(self, limit: int = 20) -> str:
        """The error train.py stops with: the first problems, and the ways forward."""
        fatal, errors = self.of("fatal"), self.of("error")
        problems = fatal + errors or self.of("dropped")  # all too long: why nothing would train
        lines = [f"{self.data_path}: training does not start, the data has problems:"]
        lines += [f"  {p}" for p in problems[:limit]]
        if len(problems) > limit:
            lines.append(f"  ... {len(problems) - limit} more")
        lines.append("List them all with: python scripts/check_data.py --data_path ... --image_folder ...")
        if fatal:
            lines.append("Fix the file or the chat template first: these are not about single records.")
        elif self.num_usable == 0:
            lines.append(self._nothing_usable())
        else:
            lines.append(
                f"Fix those records, or pass --skip_bad_samples true to train on the other "
                f"{self.num_usable} (the skipped ones go to OUTPUT_DIR/skipped_records.jsonl)."
            )
        return "\n".join(lines)

    def _nothing_usable(self) -> str:
        if self.num_records == 0:
            return "The file holds no record: is --data_path the file you mean?"
        kind, count = Counter(p.kind for p in self.of("error", "dropped")).most_common(1)[0]
        hint = NOTHING_USABLE_HINTS.get(kind, "is --data_path the file you mean?")
        return (
            f"No record is usable: all {self.num_records} have problems, so --skip_bad_samples would "
            f"leave nothing to train on. The most common problem is {kind} ({count}): {hint}"
        )

    def to_json(self) -> dict:
        return {"data_path": self.data_path, "num_records": self.num_records,
                "problems": [dataclasses.asdict(p) for p in self.problems]}

    @classmethod
    def from_json(cls, blob: dict) -> Report:
        return cls(blob["data_path"], blob["num_records"], [Problem(**p) for p in blob["problems"]])


def write_skipped(path: str, problems: list[Problem]) -> None:
    """One line per skipped record: {"position", "location", "id", "reasons"}."""
    by_record: dict[int, dict] = {}
    for p in problems:
        row = by_record.setdefault(
            p.position, {"position": p.position, "location": p.location, "id": p.record_id, "reasons": []}
        )
        row["reasons"].append(f"{p.kind}: {p.reason}")
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for _, row in sorted(by_record.items()))
