"""Images and video, from a record's names to RGB PIL images: the paths (kept inside
`--image_folder`), the decoding (any PIL mode, EXIF rotation, the decompression-bomb limit) and
video frames, sampled uniformly from a folder of frame images or from a video file (mp4, ...)
decoded by transformers' `load_video` (PyAV). Training, validation, evaluation, infer.py and the
web page all read media through here, so they see the same pixels and the same frames."""

from __future__ import annotations

import os
import re

import numpy as np
from PIL import Image, ImageOps

from data.records import DataError


class ImageError(DataError):
    """An image or video that cannot be used as it is: unsafe path, too large, unreadable."""


FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
ORIENTATION = 0x0112  # the EXIF tag of a photo's rotation
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm")


# --- paths -----------------------------------------------------------------------------------------


def resolve_image_path(image_folder: str | None, name: str) -> str:
    """`name` inside `image_folder` (the working directory when None). A data file must not read
    arbitrary files: a path is read only inside the folder the user named. An absolute name is
    read when it lies inside `--image_folder` (MiniCPM-V's docs write absolute paths), never
    when no folder was named; `..` that climbs out of the folder is refused. The check is on the
    path as written; links inside the folder are followed as usual."""
    if not isinstance(name, str) or not name.strip():
        raise ImageError(f"image name {name!r} is not a file name.")
    root = os.path.normpath(image_folder or ".")
    path = os.path.normpath(os.path.join(root, name))  # an absolute name stays itself
    climbs_out = os.path.relpath(os.path.abspath(path), os.path.abspath(root)).split(os.sep)[0] == os.pardir
    if climbs_out or (os.path.isabs(name) and image_folder is None):
        raise ImageError(
            f"image path {name!r} escapes --image_folder {image_folder!r}: a data file reads images "
            "only inside the folder --image_folder names. To read it, pass --image_folder "
            f"{os.path.dirname(os.path.abspath(path))} or a folder above it (relative image paths "
            "are then read from there too)."
        )
    return path


def image_paths(record: dict, image_folder: str | None) -> list[str]:
    images = record.get("image")
    if images is None:
        return []
    images = [images] if isinstance(images, str) else list(images)
    return [resolve_image_path(image_folder, name) for name in images]


# --- images ----------------------------------------------------------------------------------------


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """I;16 / I / F (16-bit PNG and TIFF, depth maps, scans) -> 8-bit RGB by scaling, where
    PIL's convert("RGB") clips everything above 255 to white."""
    array = np.asarray(image, dtype=np.float64)
    if image.mode == "F" and array.max(initial=0.0) <= 1.0:
        array = array * 255.0  # float images in [0, 1]
    elif image.mode.startswith("I;16") or array.max(initial=0.0) > 255:
        array = array / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8)).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparent pixels are composited on white: dropping the alpha
    channel would show whatever colour they happen to store (often black)."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return _sixteen_bit_to_rgb(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")  # L, P, 1, CMYK, YCbCr, ...


def load_image(path: str) -> Image.Image:
    """An RGB image, upright. Larger than PIL's decompression-bomb limit
    (`PIL.Image.MAX_IMAGE_PIXELS`) is an `ImageError`, never a decoder eating all memory."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and width * height > limit:
                raise Image.DecompressionBombError(f"{width * height} pixels")
            if image.mode == "RGB" and "transparency" not in image.info and not image.getexif().get(ORIENTATION):
                image.load()  # the common case, without the two copies below
                return image
            image = ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
            return to_rgb(image)
    except Image.DecompressionBombError as e:
        raise image_too_large(path, e) from e


def image_too_large(path: str, error: Exception) -> ImageError:
    return ImageError(
        f"{path}: image too large ({error}); the decompression-bomb limit is "
        f"PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS} pixels. Resize it offline."
    )


# --- video -----------------------------------------------------------------------------------------


def uniform_frame_indices(total: int, num_frames: int) -> list[int]:
    """The middle frame of each of `num_frames` equal segments (Ask-Anything's sampling); every
    frame when there are fewer."""
    count = min(num_frames, total)
    return [int((i + 0.5) * total / count) for i in range(count)]


def _natural_key(name: str) -> list:
    """frame_2.jpg before frame_10.jpg."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def video_frame_paths(folder: str, num_frames: int) -> list[str]:
    """`num_frames` frames sampled uniformly from a folder of frame images, in time (natural
    name) order."""
    if not os.path.isdir(folder):
        raise ImageError(f"video {folder}: not a folder of frame images.")
    frames = sorted((f for f in os.listdir(folder) if f.lower().endswith(FRAME_EXTENSIONS)), key=_natural_key)
    if not frames:
        raise ImageError(f"video {folder}: no frame images ({', '.join(FRAME_EXTENSIONS)}).")
    return [os.path.join(folder, frames[i]) for i in uniform_frame_indices(len(frames), num_frames)]


def is_video_file(path: str) -> bool:
    return path.lower().endswith(VIDEO_EXTENSIONS)


def _video_file_length(path: str) -> int:
    """Frames the container declares (read from its header: nothing is decoded)."""
    import av  # PyAV, transformers' default video backend

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ImageError(f"video {path}: no video stream.")
            total = container.streams.video[0].frames
    except av.FFmpegError as e:
        raise ImageError(f"video {path}: unreadable ({type(e).__name__}: {e}).") from e
    if total <= 0:
        raise ImageError(
            f"video {path}: the container does not record its frame count; re-mux it "
            "(ffmpeg -i IN -c copy OUT.mp4) or extract its frames into a folder."
        )
    return total


def _check_video(path: str) -> None:
    if not os.path.isfile(path):
        raise ImageError(f"video {path}: no such file.")
    if os.path.getsize(path) == 0:
        raise ImageError(f"video {path}: zero-byte file.")


def video_length(path: str, num_frames: int) -> int:
    """How many frames `load_video_frames` gives for this video (a folder of frames or a file),
    without decoding any: the prompt needs one `<image>` per frame before the pixels."""
    if not is_video_file(path):
        return len(video_frame_paths(path, num_frames))
    _check_video(path)
    return min(num_frames, _video_file_length(path))


def load_video_frames(path: str, num_frames: int) -> list[Image.Image]:
    """`num_frames` RGB frames sampled uniformly from a folder of frame images or a video file.
    A file that decodes to fewer frames than its header declares (truncated) is an ImageError:
    the prompt was built for the declared count."""
    if not is_video_file(path):
        return [load_image(p) for p in video_frame_paths(path, num_frames)]
    from transformers.video_utils import load_video

    _check_video(path)
    indices = uniform_frame_indices(_video_file_length(path), num_frames)
    try:
        frames, _ = load_video(
            path, backend="pyav", sample_indices_fn=lambda metadata, **_: indices
        )  # [T, H, W, 3]
    except Exception as e:  # noqa: BLE001 - PyAV and numpy raise many kinds on a damaged file
        raise ImageError(f"video {path}: cannot be decoded ({type(e).__name__}: {e}).") from e
    if len(frames) != len(indices):
        raise ImageError(
            f"video {path}: decoded {len(frames)} of the {len(indices)} frames sampled (truncated?)."
        )
    return [Image.fromarray(frame) for frame in frames]


# --- a record's media --------------------------------------------------------------------------------


def record_media_count(record: dict, image_folder: str | None, num_frames: int) -> tuple[int, int]:
    """(images, video frames) the record shows; one of them is 0."""
    if record.get("video"):
        return 0, video_length(resolve_image_path(image_folder, record["video"]), num_frames)
    return len(image_paths(record, image_folder)), 0


def record_media(record: dict, image_folder: str | None, num_frames: int) -> list[str | Image.Image]:
    """The record's media in prompt order: paths where they are files (its images, the sampled
    frames of a frame folder), decoded frames for a video file."""
    video = record.get("video")
    if not video:
        return image_paths(record, image_folder)
    path = resolve_image_path(image_folder, video)
    return load_video_frames(path, num_frames) if is_video_file(path) else video_frame_paths(path, num_frames)


def image_size(path: str) -> tuple[int, int]:
    """(height, width) of an image as `load_image` returns it (EXIF-rotated), from its header."""
    with Image.open(path) as image:
        width, height = image.size
        rotated = image.getexif().get(0x0112) in (5, 6, 7, 8)  # orientations that swap the sides
    return (width, height) if rotated else (height, width)


def load_record_media(record: dict, image_folder: str | None, num_frames: int) -> list[Image.Image]:
    """The record's images, or its video's sampled frames, in prompt order, as RGB images."""
    return [
        load_image(m) if isinstance(m, str) else m for m in record_media(record, image_folder, num_frames)
    ]
