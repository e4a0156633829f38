"""The training benchmark's settings (bench/training.py), read by the parent and by every child
process it starts, and its four recipes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fixtures.recipes import FREEZE_RECIPES

# The benchmark's recipes, by the labels its tables print (docs/benchmarks.md), each one of
# fixtures/recipes.py's: the peer can freeze and adapt (LoRA on the LLM) as each of these does.
BENCH_RECIPES = {
    "full": "full_vit_llm",  # everything trains (configs/demo.yaml)
    "frozen_vit": "full_llm",  # the tower frozen, the connector and the LLM train (llava15_finetune)
    "lora": "lora_llm",  # LoRA on the LLM, the connector trains (llava15_lora)
    "pretrain": "connector_only",  # the connector alone (llava15_pretrain)
}


def recipe_flags(recipe: str) -> dict:
    """The ModelArguments overrides of one of the benchmark's recipes."""
    return FREEZE_RECIPES[BENCH_RECIPES[recipe]]


@dataclass
class BenchArguments:
    recipe: str = field(default="all", metadata={"help": f"{' | '.join(BENCH_RECIPES)} | all"})
    shape: str = field(default="cpu_small", metadata={"help": "A name in configs/shapes/, or a .yaml path."})
    peer: bool = field(default=False, metadata={"help": "Also run the peer, alternated; print ours/peer."})
    peer_trainer: str = field(
        default="sft",
        metadata={"help": "sft: TRL's SFTTrainer (its chunked LM-head loss); trainer: transformers' Trainer."},
    )
    batch_size: int | None = field(default=None, metadata={"help": "Samples per step; default: the shape's."})
    seq_len: int | None = field(default=None, metadata={"help": "Tokens per sample, image tokens included."})
    images: int = field(default=1, metadata={"help": "Images per sample."})
    warmup_steps: int = field(default=2, metadata={"help": "Untimed steps first (optimizer states, caches)."})
    steps: int = field(default=5, metadata={"help": "Timed steps per process."})
    repeats: int = field(default=3, metadata={"help": "Processes per side; the table shows the medians."})
    # One thread by default: the 2 cores of the machine this was written on are shared, and two
    # OpenMP threads collapse when the other core is busy. Pass --threads 2 on a quiet machine.
    threads: int = field(default=1, metadata={"help": "torch / OpenMP threads of each side (CPU)."})
    gradient_checkpointing: bool = field(default=False)
    fused_loss: bool = field(default=True, metadata={"help": "Ours: the LM head fused with the loss (model/loss.py)."})
    plan_only: bool = field(
        default=False,
        metadata={"help": "Print each recipe's --dry_run plan, checkpointing off and on, from the shape's configs "
                  "alone (meta device: no weights, no training): a GPU shape planned on a laptop."},
    )
    dtype: str | None = field(default=None, metadata={"help": "Base weights; default float32 on CPU, bfloat16 on GPU."})
    # LoRA: configs/llava15_lora.yaml's r 128, alpha 256 unless the shape scales them down.
    lora_r: int | None = field(default=None, metadata={"help": "Default: the shape's lora_r, else 128."})
    lora_alpha: int | None = field(default=None, metadata={"help": "Default: the shape's lora_alpha, else 256."})
    lora_dropout: float = field(default=0.05)
    learning_rate: float = field(default=2e-5)
    workdir: str | None = field(default=None, metadata={"help": "Where built shapes are kept; default $TMPDIR/vlm_bench."})
    child: str | None = field(default=None, metadata={"help": "Internal: build | ours:RECIPE | peer:RECIPE."})

    def resolve(self, shape: dict, cuda: bool) -> None:
        """Unset settings from the shape (and the device), resolved in the parent so that every
        child gets the same values; refuses a --recipe or --peer_trainer it does not know."""
        if self.dtype is None:
            self.dtype = "bfloat16" if cuda else "float32"
        self.batch_size = self.batch_size or shape["batch_size"]
        self.seq_len = self.seq_len or shape["seq_len"]
        self.lora_r = self.lora_r or shape.get("lora_r", 128)
        self.lora_alpha = self.lora_alpha or shape.get("lora_alpha", 256)
        if self.peer_trainer not in ("sft", "trainer"):
            raise SystemExit(f"--peer_trainer {self.peer_trainer!r}: choose sft or trainer.")
        if self.recipe != "all" and self.recipe not in BENCH_RECIPES:
            raise SystemExit(f"--recipe {self.recipe!r}: choose {', '.join(BENCH_RECIPES)} or all.")

    @property
    def recipes(self) -> list[str]:
        return list(BENCH_RECIPES) if self.recipe == "all" else [self.recipe]
