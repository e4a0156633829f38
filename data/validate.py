"""Every record checked before step 1, so no run dies at step 40,000 on one corrupt JPEG or
trains silently on empty labels.

    python scripts/check_data.py --data_path train.jsonl --image_folder images/   # the same pass

`validate_data_file` reads, checks and tokenizes every record and opens every image once;
`check_training_data` is what train.py runs: cached by the data file's hash (a 600K-record
file is checked once), it refuses to start on any bad record unless `--skip_bad_samples true`,
which trains on the rest and lists the skipped records in OUTPUT_DIR/skipped_records.jsonl.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image

from constants import IGNORE_INDEX, NUM_FRAMES
from data.media import (
    ImageError,
    image_size,
    image_too_large,
    is_video_file,
    load_image,
    load_video_frames,
    resolve_image_path,
    video_frame_paths,
    video_length,
)
from data.prompt import (
    IMAGE_MARKER,
    LLAVA_ROLES,
    MAX_FULLY_MASKED_SHARE,
    VIDEO_MARKER,
    SampleTooLong,
    TemplateMismatch,
    check_fully_masked_share,
    expand_images,
    fit_length,
    llava_to_messages,
    tokenize_conversation,
)
from data.records import DataError, iter_records

VERSION = 4  # part of the cache key: a change of the checks re-checks every file

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


# --- one record -------------------------------------------------------------------------------


def check_conversation(conversations, num_images: int, video: bool = False) -> list[tuple[str, str]]:
    """(kind, reason) for each structural problem of a LLaVA conversation with `num_images`
    images (or a video). No marker at all is not one: `llava_to_messages` adds it."""
    if not isinstance(conversations, list) or not conversations:
        return [("bad_record", "no 'conversations' list of turns")]
    for k, turn in enumerate(conversations):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            return [("bad_record",
                     f"turn {k} is not {{'from': str, 'value': str}} (nor {{'role': str, 'content': str}})")]
        if turn["from"] not in LLAVA_ROLES:
            return [("roles", f"turn {k}: unknown role {turn['from']!r} (known: {', '.join(LLAVA_ROLES)})")]
    problems = []
    roles = [LLAVA_ROLES[turn["from"]] for turn in conversations]
    start = 1 if roles[0] == "system" else 0
    for k in range(start, len(roles)):
        expected = "user" if (k - start) % 2 == 0 else "assistant"
        if roles[k] != expected:
            problems.append((
                "roles",
                f"turn {k} is {conversations[k]['from']!r} where a "
                f"{'human' if expected == 'user' else 'gpt'} turn belongs: after an optional system "
                "turn, turns alternate human, gpt, human, gpt, ...",
            ))
            break
    if roles[-1] != "assistant" and not problems:
        problems.append(("ends_on_human", "the conversation ends without an answer (last turn is not gpt): "
                                          "nothing would learn from that turn; drop it or add the answer"))
    for k, (role, turn) in enumerate(zip(roles, conversations, strict=True)):
        if role == "assistant" and not turn["value"].strip():
            problems.append(("empty_answer", f"turn {k}: empty or whitespace-only gpt answer"))
        if role == "assistant" and (IMAGE_MARKER in turn["value"] or VIDEO_MARKER in turn["value"]):
            problems.append(("image_marker", f"turn {k}: {IMAGE_MARKER} or {VIDEO_MARKER} in a gpt answer"))
    questions = [t["value"] for r, t in zip(roles, conversations, strict=True) if r != "assistant"]
    markers = sum(q.count(IMAGE_MARKER) for q in questions)
    video_markers = sum(q.count(VIDEO_MARKER) for q in questions)
    if video and (markers or video_markers > 1):
        problems.append(("image_marker", f"a video record takes one {VIDEO_MARKER} marker (or none) and no "
                                         f"{IMAGE_MARKER}; it has {video_markers} and {markers}"))
    elif not video and video_markers:
        problems.append(("image_marker", f"{VIDEO_MARKER} marker in a record without a 'video'"))
    elif markers and markers != num_images:
        problems.append((
            "image_marker",
            f"{markers} {IMAGE_MARKER} markers for {num_images} images: give one marker per image "
            f"(or none at all, and one '{IMAGE_MARKER}\\n' per image goes before the first question)",
        ))
    return problems


def _image_names(record: dict) -> tuple[list[str], str | None]:
    images, video = record.get("image"), record.get("video")
    if video is not None and not (isinstance(video, str) and images is None):
        return [], "'video' must be one folder of frames or one video file, in a record without 'image'"
    if images is None:
        return [], None
    if isinstance(images, str):
        return [images], None
    if isinstance(images, list) and all(isinstance(i, str) for i in images):
        return images, None
    return [], f"'image' must be a file name or a list of them, not {images!r}"


def check_image(path: str) -> tuple[str, str] | None:
    """(kind, reason) when the image at `path` cannot be trained on; it is opened, verified
    and fully decoded exactly as training decodes it (`load_image`)."""
    if not os.path.isfile(path):
        return "missing_image", f"missing image file {path}"
    if os.path.getsize(path) == 0:
        return "empty_image", f"zero-byte image file {path}"
    try:
        with Image.open(path) as image:
            image.verify()  # checksums of PNG chunks; says little about JPEG, hence the load
        load_image(path)
    except ImageError as e:
        return "huge_image", str(e)
    except Image.DecompressionBombError as e:  # raised by Image.open itself above 2x the limit
        return "huge_image", str(image_too_large(path, e))
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        return "corrupt_image", f"corrupt or truncated image {path}: {type(e).__name__}: {e}"
    return None


def check_video_file(path: str, num_frames: int) -> tuple[str, str] | None:
    """(kind, reason) when the sampled frames of the video file at `path` cannot be decoded as
    training decodes them (`load_video_frames`)."""
    try:
        load_video_frames(path, num_frames)
    except ImageError as e:
        return "bad_video", str(e)
    return None


# --- the whole file ---------------------------------------------------------------------------


def _record_media(record: dict, image_folder: str | None, num_frames: int) -> tuple[list[str], int, list]:
    """(media paths to decode, video frames in the prompt, (kind, reason) problems) of one
    record: its images' and video's paths resolved under `image_folder`, its conversation
    checked against their count."""
    names, image_error = _image_names(record)
    video = record.get("video") if not image_error else None
    problems = [("bad_record", image_error)] if image_error else []
    problems += check_conversation(record.get("conversations"), len(names), video is not None)
    try:
        paths = [resolve_image_path(image_folder, name) for name in names + ([video] if video is not None else [])]
    except ImageError as e:
        return [], 0, [*problems, ("image_path", str(e))]
    if video is None or not paths:
        return paths, 0, problems
    try:
        if is_video_file(paths[0]):  # the file is decoded with the images
            return paths, video_length(paths[0], num_frames), problems
        frames = video_frame_paths(paths[0], num_frames)
        return frames, len(frames), problems
    except ImageError as e:
        return [], 0, [*problems, ("bad_video", str(e))]


# A released VLM's image expansion by image size: [(height, width)] -> tokens per image, or None
# where its processor does not say (`data.processor_prompt.ImageTokenCount`; its `settings`
# string is part of the cache key).
ImageTokenCounter = Callable[[list[tuple[int, int]]], list[int] | None]


@dataclass
class _LabelCheck:
    """Tokenizes records as training does: too long, no supervised token, and the template
    problems that concern the file as a whole (the first mismatch; most samples fully masked).
    `image_tokens`: a released VLM's count per image size, so that a sample is as long here as its
    processor will make it (without it, each image is `num_image_tokens` long)."""

    tokenizer: object
    num_image_tokens: int
    image_token_index: int
    max_length: int
    image_tokens: ImageTokenCounter | None = None
    template_error: Problem | None = None
    num_tokenized: int = 0
    num_fully_masked: int = 0

    def check(self, raw, num_images: int, num_video_frames: int, sizes: list | None = None) -> tuple[str, str] | None:
        """(kind, reason) when this record cannot train as it is. `sizes`: its images' (height,
        width), in order."""
        if self.template_error:
            return None  # the template is wrong for every record: tokenizing more says nothing
        messages = llava_to_messages(raw.record["conversations"], num_images, num_video_frames)
        known = self.image_tokens and sizes and all(sizes) and not num_video_frames
        counts = self.image_tokens(sizes) if known else None
        try:
            ids, labels = tokenize_conversation(self.tokenizer, messages, self.num_image_tokens, self.image_token_index)
            # Where the text shows each image as one token, expand it as the processor will.
            if counts and ids.count(self.image_token_index) == len(counts):
                ids, labels = expand_images(ids, labels, self.image_token_index, counts)
            ids, labels = fit_length(ids, labels, self.image_token_index, self.max_length)
        except SampleTooLong as e:
            return "too_long", f"too long: {e} Dropped: cutting would lose image tokens or every answer."
        except TemplateMismatch as e:
            self.template_error = Problem(None, "file", None, "template", f"{e} (first seen at {raw.location})")
            return None
        self.num_tokenized += 1
        if all(label == IGNORE_INDEX for label in labels):
            self.num_fully_masked += 1
            return "no_labels", "no supervised token: the chat template renders no answer text"
        return None

    def file_problems(self) -> list[Problem]:
        problems = [self.template_error] if self.template_error else []
        try:
            check_fully_masked_share(self.num_fully_masked, self.num_tokenized)
        except TemplateMismatch as e:
            problems.append(Problem(None, "file", None, "template", str(e)))
        return problems


def _check_media_files(users: dict[str, list], num_frames: int, num_workers: int,
                       sizes: bool = False) -> tuple[list[Problem], dict[str, tuple[int, int]]]:
    """Decodes every image and video once (`num_workers` threads); a bad one is a problem of
    each record in `users[path]` (path -> the records that use it). With `sizes`, also each good
    image's (height, width) as training sees it."""
    paths = sorted(users)
    problems, found = [], {}

    def check(path: str):
        if is_video_file(path):
            return check_video_file(path, num_frames), None
        problem = check_image(path)
        return problem, image_size(path) if sizes and problem is None else None

    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        for path, (result, size) in zip(paths, pool.map(check, paths), strict=True):
            if result is not None:
                problems += [Problem.for_record(raw, *result) for raw in users[path]]
            if size is not None:
                found[path] = size
    return problems, found


def validate_data_file(
    data_path: str,
    tokenizer,
    num_image_tokens: int,
    image_token_index: int,
    max_length: int,
    image_folder: str | None,
    num_workers: int = 4,
    num_frames: int = NUM_FRAMES,
    image_tokens: ImageTokenCounter | None = None,
) -> Report:
    """Reads, checks and tokenizes every record and decodes every image (once, `num_workers`
    threads). The report lists each problem with the record's position, line or index and id.
    `image_tokens`: a released VLM's tokens per image size (see `_LabelCheck`)."""
    report = Report(data_path)
    try:
        raws = list(iter_records(data_path))
    except DataError as e:
        report.problems.append(Problem(None, "file", None, "unreadable_file", str(e)))
        return report
    report.num_records = len(raws)
    first_seen: dict[str, str] = {}
    users: dict[str, list] = {}  # media path -> records using it
    labels = _LabelCheck(tokenizer, num_image_tokens, image_token_index, max_length, image_tokens)
    to_tokenize = []  # (raw, media paths, video frames) of records whose media is as the text says
    for raw in raws:
        if raw.error is not None:
            report.problems.append(Problem.for_record(raw, raw.error_kind, raw.error))
            continue
        if raw.record_id in first_seen:
            duplicate = f"duplicate id, first at {first_seen[raw.record_id]}"
            report.problems.append(Problem.for_record(raw, "duplicate_id", duplicate))
        elif raw.record_id is not None:
            first_seen[raw.record_id] = raw.location
        paths, num_video_frames, problems = _record_media(raw.record, image_folder, num_frames)
        for path in paths:
            users.setdefault(path, []).append(raw)
        report.problems += [Problem.for_record(raw, kind, reason) for kind, reason in problems]
        if not problems:
            to_tokenize.append((raw, paths, num_video_frames))
    media_problems, sizes = _check_media_files(users, num_frames, num_workers, sizes=image_tokens is not None)
    for raw, paths, num_video_frames in to_tokenize:
        label_problem = labels.check(raw, len(paths), num_video_frames, [sizes.get(p) for p in paths])
        if label_problem:
            report.problems.append(Problem.for_record(raw, *label_problem))
    report.problems += labels.file_problems()
    report.problems += media_problems
    report.problems.sort(key=lambda p: (p.position is not None, p.position or 0))
    return report


# --- what train.py runs -----------------------------------------------------------------------


def default_cache_dir() -> str:
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_home, "vlm-finetune", "data-check")


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(data_path: str, tokenizer, num_image_tokens, image_token_index, max_length, image_folder,
              num_frames, image_tokens: ImageTokenCounter | None = None) -> str:
    """sha256 of the data file and of every setting the checks depend on. (Images edited in
    place after a check are not seen: delete the cache folder to check again.)"""
    settings = {
        "version": VERSION,
        "data": _file_sha256(data_path),
        "tokenizer": [tokenizer.name_or_path, len(tokenizer), tokenizer.chat_template],
        "image_tokens": [num_image_tokens, image_token_index, getattr(image_tokens, "settings", None)],
        "max_length": max_length,
        "num_frames": num_frames,
        "image_folder": os.path.abspath(image_folder or "."),
        "max_image_pixels": Image.MAX_IMAGE_PIXELS,
        "max_fully_masked_share": MAX_FULLY_MASKED_SHARE,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def validate_cached(data_path, tokenizer, num_image_tokens, image_token_index, max_length, image_folder,
                    cache_dir: str | None = None, num_frames: int = NUM_FRAMES,
                    image_tokens: ImageTokenCounter | None = None) -> Report:
    """`validate_data_file`, or its stored report when this file was checked with the same
    settings before."""
    settings = (tokenizer, num_image_tokens, image_token_index, max_length, image_folder)
    if not os.path.isfile(data_path):
        return validate_data_file(data_path, *settings, num_frames=num_frames, image_tokens=image_tokens)
    key = cache_key(data_path, *settings, num_frames, image_tokens)
    cache_file = os.path.join(cache_dir or default_cache_dir(), key + ".json")
    if os.path.isfile(cache_file):
        with open(cache_file) as f:
            return Report.from_json(json.load(f))
    report = validate_data_file(data_path, *settings, num_frames=num_frames, image_tokens=image_tokens)
    os.makedirs(os.path.dirname(cache_file), exist_ok=True)
    with open(cache_file + ".tmp", "w") as f:
        json.dump(report.to_json(), f)
    os.replace(cache_file + ".tmp", cache_file)  # atomic: another rank never reads half a file
    return report


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


def check_training_data(data_args, tokenizer, num_image_tokens, image_token_index, output_dir=None,
                        image_tokens: ImageTokenCounter | None = None) -> set[int]:
    """The check train.py runs before step 1 (`--validate_data true`, the default). Returns the
    positions of the records to leave out; raises `DataError` when training must not start.
    `output_dir`: where skipped_records.jsonl goes (None on ranks that do not save);
    `image_tokens`: a released VLM's tokens per image size."""
    if not data_args.validate_data:
        return set()
    report = validate_cached(
        data_args.data_path, tokenizer, num_image_tokens, image_token_index, data_args.max_length,
        data_args.image_folder, data_args.data_check_cache, data_args.num_frames, image_tokens,
    )
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
    return report.skip_positions()
