"""The `--dry_run` memory plan against a measured peak, for a few recipes on the tiny base.

    python -m bench.memory                       # the default recipes, CPU RSS
    python -m bench.memory --batch_size 32 --seq_len 512

(from the repository's root, as every benchmark runs). The recipes are fixtures/recipes.py's.

Each run in its own subprocess: build + freeze; one warm-up forward/backward of a
single short sample (the first forward loads kernels and thread workspaces, ~20 MiB whatever
the batch; its gradients are dropped); read the baseline RSS and reset the peak
(/proc/self/clear_refs); a few real VLMTrainer steps (fixed-length samples, one per batch a
little shorter, so the batch is padded as the collator pads real data); read the peak RSS
(VmHWM). Measured = peak - baseline: what training added on top of the loaded model. The
plan's counterpart is gradients + AdamW states + activations (`MemoryPlan.training_overhead`).

glibc hands a freed block back to the OS only when it was mmap-ed, and by default it raises the
mmap threshold after each free (up to 32 MiB), after which freed tensors stay resident and RSS
overstates what is live. The child pins the threshold (MALLOC_MMAP_THRESHOLD_=65536) so RSS
tracks live memory, as `torch.cuda.max_memory_allocated` does on a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile

if __package__ in (None, ""):  # run by its path: bench/ is then sys.path[0], and `bench` no package
    sys.exit("Run the benchmarks as modules, from the repository's root: python -m bench.memory --help")

from bench.measure import peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402
from constants import IGNORE_INDEX  # noqa: E402
from fixtures.recipes import FREEZE_RECIPES  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_RECIPES = ["connector_only", "full_llm", "lora_llm", "qlora_nf4"]


def run_one(base_dir: str, recipe: str, batch_size: int, seq_len: int, steps: int, ckpt: bool) -> dict:
    """In the child: build, freeze, warm up, baseline, train, peak. Returns the figures."""
    import torch

    from config import ModelArguments, TrainArguments
    from model.freeze import apply_freeze_policy
    from model.memory_plan import plan_memory
    from run.checkpoint import load_base
    from run.trainer import VLMTrainer

    args = ModelArguments(
        vision_model=os.path.join(base_dir, "vision"), llm_model=os.path.join(base_dir, "llm"), **FREEZE_RECIPES[recipe]
    )
    torch.manual_seed(0)
    model = load_base(args)
    apply_freeze_policy(model, args)
    plan = plan_memory(model, batch_size, seq_len, ckpt)

    vocab = model.llm.get_input_embeddings().num_embeddings
    dataset = FixedLength(batch_size, steps, seq_len, vocab, model.num_image_tokens, model.vision.image_size)
    train_args = TrainArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=batch_size,
        max_steps=steps,
        learning_rate=1e-4,
        gradient_checkpointing=ckpt,
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = VLMTrainer(model=model, args=train_args, train_dataset=dataset, data_collator=pad_collate)
    warm_up(model, dataset)
    baseline = rss_bytes()
    reset_peak_rss()
    trainer.train()
    peak = peak_rss_bytes()
    return {
        "recipe": recipe,
        "checkpointing": ckpt,
        "baseline": baseline,
        "peak": peak,
        "measured": peak - baseline,
        "planned": plan.training_overhead,
        "plan_weights": plan.weights_total,
        "plan_gradients": plan.gradients,
        "plan_optimizer": plan.optimizer,
        "plan_activations": plan.activations,
    }


class FixedLength:
    """`batch_size * steps` seeded samples of `seq_len` tokens, one per batch 4 shorter (so the
    batch is padded, as the collator pads real data): a text token, the image slots, then text
    with labels."""

    def __init__(self, batch_size: int, steps: int, seq_len: int, vocab: int, n_image: int, image_size: int):
        self.batch_size, self.steps, self.seq_len = batch_size, steps, seq_len
        self.vocab, self.n_image, self.image_size = vocab, n_image, image_size

    def __len__(self):
        return self.batch_size * self.steps

    def __getitem__(self, i):
        import torch

        from model.vlm import IMAGE_TOKEN_INDEX

        g = torch.Generator().manual_seed(i)
        length = self.seq_len - (4 if i % self.batch_size == 0 else 0)  # one shorter sample per batch
        ids = torch.randint(3, self.vocab, (length,), generator=g)
        ids[1 : 1 + self.n_image] = IMAGE_TOKEN_INDEX
        labels = ids.clone()
        labels[: 1 + self.n_image] = IGNORE_INDEX
        size = self.image_size
        return {"input_ids": ids, "labels": labels, "pixel_values": torch.randn(1, 3, size, size, generator=g)}


def pad_collate(examples):
    """Rows padded on the right to the longest, with their attention mask; images concatenated."""
    import torch

    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), longest, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = e["input_ids"], e["labels"], 1
    pixels = torch.cat([e["pixel_values"] for e in examples])
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": pixels}


def warm_up(model, dataset: FixedLength) -> None:
    """The first forward loads kernels and allocates thread-local workspaces (~20 MiB here,
    whatever the batch). One short sample, its gradients dropped, puts that in the baseline
    without leaving a tensor the plan counts."""
    n_image = dataset.n_image
    short = pad_collate([{k: v[: 2 + n_image] if k != "pixel_values" else v for k, v in dataset[1].items()}])
    model(**short).loss.backward()
    model.zero_grad(set_to_none=True)
    gc.collect()


def child_command(base_dir: str, run: str, batch_size: int, seq_len: int, steps: int) -> list[str]:
    """The command that measures one run ("recipe" or "recipe:ckpt") in a fresh process: runs
    never share one, since a later run would reuse heap the earlier one freed and read low.
    Run it with cwd at the repository's root."""
    return [
        sys.executable, "-m", "bench.memory", "--child", run, "--base", base_dir,
        "--batch_size", str(batch_size), "--seq_len", str(seq_len), "--steps", str(steps),
    ]


# glibc: every block above 64 KiB is mmap-ed, so a freed tensor leaves RSS (see the docstring).
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "TOKENIZERS_PARALLELISM": "false"}


def measure(base_dir: str, run: str, batch_size: int, seq_len: int, steps: int) -> dict:
    out = subprocess.run(
        child_command(base_dir, run, batch_size, seq_len, steps),
        env={**os.environ, **CHILD_ENV}, cwd=REPO, capture_output=True, text=True, check=False,
    )
    if out.returncode:
        raise RuntimeError(f"{run} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def ensure_base(base_dir: str | None) -> str:
    if base_dir:
        return base_dir
    from fixtures.synthetic import vocabulary
    from fixtures.tiny_base import make_tiny_base

    base_dir = os.path.join(tempfile.gettempdir(), "bench_memory_tiny_base")
    if not os.path.isdir(os.path.join(base_dir, "llm")):
        make_tiny_base(base_dir, vocabulary(), seed=0)
    return base_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES, choices=list(FREEZE_RECIPES))
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=320, help="tokens per sample, image tokens included")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--base", default=None, help="tiny base folder (vision/, llm/); built if absent")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        import torch

        torch.set_num_threads(1)
        recipe, _, mode = args.child.partition(":")
        figures = run_one(args.base, recipe, args.batch_size, args.seq_len, args.steps, ckpt=mode == "ckpt")
        print(json.dumps(figures))
        return

    base_dir = ensure_base(args.base)
    runs = [f"{recipe}{mode}" for recipe in args.recipes for mode in ("", ":ckpt")]
    mib = 2**20
    print(f"batch {args.batch_size} x {args.seq_len} tokens, {args.steps} steps, CPU RSS (MiB)")
    print(f"{'recipe':<16} {'ckpt':<5} {'planned':>9} {'measured':>9} {'plan/meas':>9}")
    for run in runs:
        r = measure(base_dir, run, args.batch_size, args.seq_len, args.steps)
        print(
            f"{r['recipe']:<16} {'on' if r['checkpointing'] else 'off':<5} {r['planned'] / mib:>9.1f} "
            f"{r['measured'] / mib:>9.1f} {r['planned'] / r['measured']:>9.3f}"
        )


if __name__ == "__main__":
    main()
