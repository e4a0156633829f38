"""Write a seeded, randomly initialised tiny base: DIR/vision (CLIP or SigLIP tower + image
processor) and DIR/llm (Llama + a tokenizer with a chat template), each loadable with
`from_pretrained(path)` exactly like a hub id. Tests, the demo and CI use only such bases.

    python -m scripts.make_tiny_base --out outputs/tiny-base [--seed 0] [--vision siglip]

(from the repository's root, as every script in scripts/ runs).
"""

import os
import sys

# Run by its path (`python scripts/x.py`) too: the repo's root, where its modules live, comes first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import startup  # noqa: F401  (first: before any library loads)

from dataclasses import dataclass, field

from transformers import HfArgumentParser

from fixtures.synthetic import vocabulary
from fixtures.tiny_base import make_tiny_base


@dataclass
class Arguments:
    out: str = field(metadata={"help": "Folder to write vision/ and llm/ into."})
    seed: int = field(default=0)
    vision: str = field(default="clip", metadata={"help": "clip | siglip"})


if __name__ == "__main__":
    (args,) = HfArgumentParser(Arguments).parse_args_into_dataclasses()
    paths = make_tiny_base(args.out, vocabulary(), seed=args.seed, vision=args.vision)
    print(f"vision: {paths['vision']}\nllm: {paths['llm']}")
