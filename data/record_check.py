"""The checks of one record before step 1: its conversation's structure against its media,
its images' and video's paths resolved (`record_media_paths`), and each media file decoded
exactly as training decodes it (`check_media_files`, once per file however many records use it).
Each check gives (kind, reason) pairs, kinds of data/problems.py's SEVERITY."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

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
from data.problems import Problem
from data.prompt import IMAGE_MARKER, LLAVA_ROLES, VIDEO_MARKER


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


def record_media_paths(record: dict, image_folder: str | None, num_frames: int) -> tuple[list[str], int, list]:
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




def check_media_files(users: dict[str, list], num_frames: int, num_workers: int,
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
