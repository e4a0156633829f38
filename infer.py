"""Answer questions with a trained checkpoint: base + delta, loaded by the one strict loader.

    python infer.py --checkpoint outputs/demo --image photo.png --prompt "What color are the shapes?"
    python infer.py --checkpoint outputs/demo --image a.png b.png --prompt "<image> vs <image>: which is red?"
    python infer.py --checkpoint outputs/demo --video clip.mp4 --num_frames 8 --prompt "What happens?"
    python infer.py --checkpoint outputs/demo --video frames/ --num_frames 8 --prompt "What happens?"
    python infer.py --checkpoint outputs/demo --data eval.json --image_folder DIR --output preds.jsonl

The checkpoint folder alone says which base to load (its manifest); `--base_vision` /
`--base_llm` point at another copy of the same base (the fingerprint is still checked).
"""

from __future__ import annotations

import startup  # noqa: F401  (first: before any library loads)

import json
import tempfile
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from constants import NUM_FRAMES
from data.dataset import read_records
from data.media import load_image, load_video_frames
from data.messages import as_llava_file
from data.prompt import MarkerMismatch, question_messages
from run.checkpoint import load_checkpoint
from run.predict import MAX_NEW_TOKENS, accuracy, generate_answers, predict_records


@dataclass
class InferArguments:
    checkpoint: str = field(metadata={"help": "A checkpoint folder written by train.py."})
    image: list[str] | None = field(
        default=None, metadata={"help": "Image file(s) for --prompt, in the order of its <image> markers."}
    )
    video: str | None = field(
        default=None, metadata={"help": "A video file (mp4, ...) or a folder of frames for --prompt."}
    )
    num_frames: int = field(default=NUM_FRAMES, metadata={"help": "Frames sampled from a video."})
    prompt: str | None = field(default=None, metadata={"help": "The question."})
    data: str | None = field(
        default=None,
        metadata={"help": "Records to answer: LLaVA .json/.jsonl, or a messages-format file, save_to_disk folder or hub id."},
    )
    split: str = field(default="test", metadata={"help": "Split of a hub-id --data."})
    image_folder: str | None = field(default=None)
    output: str | None = field(default=None, metadata={"help": "Where --data predictions go."})
    base_vision: str | None = field(default=None, metadata={"help": "Override the base tower."})
    base_llm: str | None = field(default=None, metadata={"help": "Override the base LLM."})
    bits: int | None = field(default=None, metadata={"help": "Load the base in 8/4 bits."})
    allow_base_mismatch: bool = field(default=False, metadata={"help": "Loudly skip the check."})
    max_new_tokens: int = field(default=MAX_NEW_TOKENS)
    batch_size: int = field(default=32)


def main(argv=None):
    (args,) = HfArgumentParser(InferArguments, allow_abbrev=False).parse_args_into_dataclasses(args=argv)
    if (args.prompt is None) == (args.data is None):
        raise SystemExit("Give either --prompt (with --image or --video) or --data, not both.")
    if args.image and args.video:
        raise SystemExit("Give --image or --video, not both.")
    model, inputs, _ = load_checkpoint(
        args.checkpoint, args.base_vision, args.base_llm, args.allow_base_mismatch, bits=args.bits
    )
    if args.prompt is not None:
        if args.video:
            images = load_video_frames(args.video, args.num_frames)
        else:
            images = [load_image(path) for path in args.image or []]
        try:  # the web page's typed question comes through the same rule
            messages = question_messages(args.prompt, len(images), video=bool(args.video))
        except MarkerMismatch as error:
            raise SystemExit(f"--prompt has {error}") from error
        (answer,) = generate_answers(model, inputs, [(messages, images)], args.max_new_tokens)
        print(answer)
        return
    with tempfile.TemporaryDirectory() as scratch:  # a messages-format dataset's conversion
        data_path, image_folder = as_llava_file(args.data, args.image_folder, scratch, args.split)
        results = predict_records(
            model, inputs, read_records(data_path), image_folder, args.batch_size,
            args.max_new_tokens, args.num_frames,
        )
    if args.output:
        with open(args.output, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    print(f"accuracy: {accuracy(results):.4f}")


if __name__ == "__main__":
    from cli import run_main

    run_main(main)
