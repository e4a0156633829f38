"""Answer questions with a trained checkpoint: base + delta, loaded by the one strict loader.

    python infer.py --checkpoint outputs/demo --image photo.png --prompt "What color are the shapes?"
    python infer.py --checkpoint outputs/demo --data eval.json --image_folder DIR --output preds.jsonl

The checkpoint folder alone says which base to load (its manifest); `--base_vision` /
`--base_llm` point at another copy of the same base (the fingerprint is still checked).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from data.dataset import load_image, read_records
from evaluate import accuracy, generate_answers, predict_records
from model.checkpoint import load_checkpoint


@dataclass
class InferArguments:
    checkpoint: str = field(metadata={"help": "A checkpoint folder written by train.py."})
    image: list[str] | None = field(default=None, metadata={"help": "Image file(s) for --prompt."})
    prompt: str | None = field(default=None, metadata={"help": "The question."})
    data: str | None = field(default=None, metadata={"help": "LLaVA .json/.jsonl to answer."})
    image_folder: str | None = field(default=None)
    output: str | None = field(default=None, metadata={"help": "Where --data predictions go."})
    base_vision: str | None = field(default=None, metadata={"help": "Override the base tower."})
    base_llm: str | None = field(default=None, metadata={"help": "Override the base LLM."})
    bits: int | None = field(default=None, metadata={"help": "Load the base in 8/4 bits."})
    allow_base_mismatch: bool = field(default=False, metadata={"help": "Loudly skip the check."})
    max_new_tokens: int = field(default=64)
    batch_size: int = field(default=32)


def main(argv=None):
    (args,) = HfArgumentParser(InferArguments, allow_abbrev=False).parse_args_into_dataclasses(args=argv)
    if (args.prompt is None) == (args.data is None):
        raise SystemExit("Give either --prompt (with --image) or --data, not both.")
    model, tokenizer, image_processor, _ = load_checkpoint(
        args.checkpoint, args.base_vision, args.base_llm, args.allow_base_mismatch, bits=args.bits
    )
    if args.prompt is not None:
        images = [load_image(path) for path in args.image or []]
        markers = "".join("<image>\n" for _ in images) if "<image>" not in args.prompt else ""
        messages = [{"role": "user", "content": markers + args.prompt}]
        (answer,) = generate_answers(model, tokenizer, image_processor, [(messages, images)], args.max_new_tokens)
        print(answer)
        return
    results = predict_records(
        model, tokenizer, image_processor, read_records(args.data), args.image_folder, args.batch_size, args.max_new_tokens
    )
    if args.output:
        with open(args.output, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    print(f"accuracy: {accuracy(results):.4f}")


if __name__ == "__main__":
    main()
