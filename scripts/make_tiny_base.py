"""Write a seeded, randomly initialised tiny base: DIR/vision (CLIP or SigLIP tower + image
processor) and DIR/llm (Llama + a tokenizer with a chat template), each loadable with
`from_pretrained(path)` exactly like a hub id. Tests, the demo and CI use only such bases.

    python scripts/make_tiny_base.py --out outputs/tiny-base [--seed 0] [--vision siglip]
"""

import os
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.synthetic import vocabulary  # noqa: E402
from tools.tiny_base import make_tiny_base  # noqa: E402


@dataclass
class Arguments:
    out: str = field(metadata={"help": "Folder to write vision/ and llm/ into."})
    seed: int = field(default=0)
    vision: str = field(default="clip", metadata={"help": "clip | siglip"})


if __name__ == "__main__":
    (args,) = HfArgumentParser(Arguments).parse_args_into_dataclasses()
    paths = make_tiny_base(args.out, vocabulary(), seed=args.seed, vision=args.vision)
    print(f"vision: {paths['vision']}\nllm: {paths['llm']}")
