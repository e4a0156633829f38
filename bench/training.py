"""Training speed, model FLOPs, MFU and peak memory of a recipe; with --peer, against what a user
would pick instead: transformers' LlavaForConditionalGeneration trained by TRL's SFTTrainer.

    python -m scripts.bench --peer                        # cpu_small, every recipe: rows + ours/peer
    python -m scripts.bench --recipe lora                 # one row, ours only
    python -m scripts.bench --shape siglip_so400m_qwen25_05b --peer     # on a GPU (bf16)
    python -m scripts.bench --peer --peer_trainer trainer # the peer through transformers' Trainer
    python -m scripts.bench --shape siglip_so400m_qwen25_05b --dtype bfloat16 --plan_only  # no weights
    python -m scripts.bench --shape cpu_qwen25vl --peer   # native: one released Qwen2.5-VL, both sides

(from the repository's root, as every script in scripts/ runs).

A shape (configs/shapes/NAME.yaml) is a vision config and an LLM config (or one released model's,
`kind: native`) and a default batch, built once with random weights and saved with
save_pretrained (scripts/bench_shapes.py), so both sides load through from_pretrained as a real
run does and their losses agree (the table prints both sides' first loss and mean training loss).
The sides are built in scripts/bench_sides.py, measured with scripts/bench_measure.py.

Both sides run the Trainer's loop (forward, backward, gradient clipping, fused AdamW, zero_grad)
on the same synthetic batches, which have no padding: ours through VLMTrainer (the project's
training path, parameter groups per component), the peer through SFTTrainer (or Trainer). Each
measurement is its own process, the sides alternated (ours, peer, ours, peer, ...); the table
shows medians, so neither side inherits the other's heap and machine drift cancels. Threads are
set alike on both sides (--threads, OMP_NUM_THREADS).

In a process: build, `--warmup_steps` untimed steps, `--steps` timed ones (the median interval
is the step time; the process's CPU time per step is shown beside it, which other processes on a
shared machine do not inflate), then one memory step. Peak memory is counted, not sampled: the
model's parameters and buffers and the optimizer's states (each storage once) plus the peak of
tensor bytes that the memory step allocates on top of them (see `StepMemory`). Peak RSS is read
before the memory step, whose profiler allocates too. The plan is our model's `--dry_run` plan
(`tools.memory.plan_memory`) for the same batch. The device's peak
FLOP/s is a large matmul (fp32 on a CPU, bf16 on a GPU) timed in every process; the best counts.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from scripts.bench_measure import MEMORY_STEPS, device_peak_flops, first_loss, step_clock, tensor_bytes
from scripts.bench_shapes import (
    base_dir,
    build_base,
    build_native,
    image_tokens_per_image,
    is_native,
    load_shape,
    native_config,
    native_processor,
    native_samples,
    supervised_positions,
    work_dir,
    write_configs,
)
from scripts.bench_sides import RECIPES, Side, build_side, model_args_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = "BENCH_RESULT "
MIB = 2**20


@dataclass
class BenchArguments:
    recipe: str = field(default="all", metadata={"help": f"{' | '.join(RECIPES)} | all"})
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


# --- one side, in its own process -----------------------------------------------------------------


def make_trainer(args: BenchArguments, side: str, built: Side, clock, device):
    """Ours: VLMTrainer; the peer: TRL's SFTTrainer (or transformers' Trainer). The same loop
    settings on both sides, over `warmup_steps + steps + MEMORY_STEPS` steps of the same batches."""
    from datasets import Dataset

    steps = args.warmup_steps + args.steps + MEMORY_STEPS
    dataset = Dataset.from_dict({"idx": [i % args.batch_size for i in range(args.batch_size * steps)]})
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="bench-"),
        per_device_train_batch_size=args.batch_size,
        max_steps=steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        activation_checkpointing=args.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        bf16=device.type == "cuda",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
    )
    data = dict(model=built.model, train_dataset=dataset, data_collator=built.collate, callbacks=[clock])
    if side == "ours":
        from config import TrainArguments
        from run.trainer import VLMTrainer

        return VLMTrainer(args=TrainArguments(**common), **data)
    if args.peer_trainer == "sft":
        from trl import SFTConfig, SFTTrainer

        from patches import cap_trl_chunk_size
        from tools.tiny_base import build_tokenizer

        # TRL scores the LM head in tiles 32768 words wide: a fraction of a real vocabulary
        # (Qwen2.5: 151,936) but 8x all of cpu_small's, where the tile's unused columns would
        # count against the peer. No wider than the vocabulary, it costs what it does at a real one.
        cap_trl_chunk_size(built.vocab)
        config = SFTConfig(**common, gradient_checkpointing=args.gradient_checkpointing,
                           dataset_kwargs={"skip_prepare_dataset": True})
        # SFTTrainer wants a tokenizer; the batches are already token ids, so any one does.
        return SFTTrainer(args=config, processing_class=build_tokenizer(["a b c"], vocab_size=300), **data)
    from transformers import Trainer, TrainingArguments

    return Trainer(args=TrainingArguments(**common), **data)


def run_side(args: BenchArguments, side: str, recipe: str) -> dict:
    """In the child: build one side, warm up, train `warmup_steps + steps`, measure."""
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak_flops = device_peak_flops(device, torch.float32 if device.type == "cpu" else torch.bfloat16)
    built = build_side(args, side, recipe, device)
    loss0 = first_loss(built.model, built.collate, args.batch_size, device)
    clock = step_clock(device, args.warmup_steps + args.steps)
    trainer = make_trainer(args, side, built, clock, device)
    train_loss = trainer.train().training_loss
    return side_result(args, side, recipe, built, trainer, clock, device) | {
        "loss0": loss0, "train_loss": train_loss, "device_flops": peak_flops,
    }


def side_result(args: BenchArguments, side: str, recipe: str, built: Side, trainer, clock, device) -> dict:
    """The child's figures: step times, counted and resident memory, the plan, FLOPs."""
    from tools.memory import weight_bytes

    timed_end = args.warmup_steps + args.steps

    def timed(stamps):  # the timed steps' intervals, each from the end of the step before
        return [b - a for a, b in zip(stamps[args.warmup_steps - 1 : timed_end - 1], stamps[args.warmup_steps : timed_end],
                                      strict=True)]

    # CPU time of this process per step: on a shared machine, robust to other processes taking
    # the core (wall time is not); equal to wall time on a quiet machine with one thread.
    intervals, cpu_intervals = timed(clock.wall), timed(clock.cpu)
    weights = sum(weight_bytes(built.model).values())
    states = tensor_bytes(v for state in trainer.optimizer.state.values() for v in state.values())
    plan = built.plan
    return {
        "side": side,
        "recipe": recipe,
        "step_s": statistics.median(intervals),
        "intervals": intervals,
        "cpu_s": statistics.median(cpu_intervals),
        # Tensors counted, the rest measured: the model's parameters and buffers and the
        # optimizer's states (each storage once: what a GPU allocator holds for them) plus the
        # peak that a training step adds on top of them (gradients, activations, the loss).
        "peak_bytes": weights + states + clock.step_bytes,
        # The process's peak resident set (host memory) through the timed steps: tensors plus
        # libtorch's code, Python, mapped weight files and what glibc keeps after frees. Shown
        # beside the counted peak, for both sides alike.
        "rss_bytes": clock.rss_bytes,
        "weight_bytes": weights,
        "state_bytes": states,
        "step_bytes": clock.step_bytes,
        "plan_total": plan.total if plan else None,
        "plan_step": plan.gradients + plan.activations if plan else None,
        "flops": built.flops,
        "counts": built.counts,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "device": str(device),
        "dtype": args.dtype,
    }


# --- the parent: alternate, take medians, print -----------------------------------------------------


def _words(args: BenchArguments, **override) -> list[str]:
    words = []
    for f in dataclasses.fields(args):
        value = override.get(f.name, getattr(args, f.name))
        if value is not None:
            words += [f"--{f.name}", str(value)]
    return words


def _child(args: BenchArguments, what: str) -> dict | None:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-m", "scripts.bench", *_words(args, child=what)],
                         cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"bench child {what!r} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    lines = [line for line in out.stdout.splitlines() if line.startswith(RESULT)]
    return json.loads(lines[-1][len(RESULT) :]) if lines else None


def _device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except ImportError:
        pass
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "CPU")
    return f"{model}, {os.cpu_count()} cores"


def summarize(runs: list[dict], device_flops: float) -> dict:
    step = statistics.median(r["step_s"] for r in runs)
    first = runs[0]
    tokens = first["batch_size"] * first["seq_len"]
    return {
        "step_s": step,
        "cpu_s": statistics.median(r["cpu_s"] for r in runs),
        "samples_s": first["batch_size"] / step,
        "tokens_s": tokens / step,
        "peak_mib": statistics.median(r["peak_bytes"] for r in runs) / MIB,
        "step_mib": statistics.median(r["step_bytes"] for r in runs) / MIB,
        "rss_mib": statistics.median(r["rss_bytes"] for r in runs) / MIB,
        "loss0": first["loss0"],
        "train_loss": statistics.median(r["train_loss"] for r in runs),
        "device_flops": device_flops,
    }


HEADER = (f"{'recipe':<11} {'side':<5} {'step_s':>7} {'cpu_s':>7} {'samples/s':>9} {'tokens/s':>8} "
          f"{'GFLOP/step':>10} {'GFLOP/s':>7} {'MFU':>5} {'peak_MiB':>8} {'plan_MiB':>8} {'peak/plan':>9} "
          f"{'step_MiB':>8} {'plan_step':>9} {'rss_MiB':>8} {'loss0':>7} {'loss':>7}")


def format_row(recipe: str, side: str, s: dict, flops: float, plan_total: int | None, plan_step: int | None) -> str:
    """One row of the table; the plan's columns read "-" where there is no plan (a native shape)."""
    achieved = flops / s["step_s"]
    if plan_total:
        plan = f"{plan_total / MIB:>8.1f} {s['peak_mib'] * MIB / plan_total:>9.3f}"
        step = f"{plan_step / MIB:>9.1f}"
    else:
        plan, step = f"{'-':>8} {'-':>9}", f"{'-':>9}"
    return (
        f"{recipe:<11} {side:<5} {s['step_s']:>7.4f} {s['cpu_s']:>7.4f} {s['samples_s']:>9.2f} "
        f"{s['tokens_s']:>8.1f} {flops / 1e9:>10.3f} {achieved / 1e9:>7.2f} {achieved / s['device_flops']:>5.3f} "
        f"{s['peak_mib']:>8.1f} {plan} {s['step_mib']:>8.1f} {step} {s['rss_mib']:>8.1f} "
        f"{s['loss0']:>7.4f} {s['train_loss']:>7.4f}"
    )


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(BenchArguments, allow_abbrev=False).parse_args_into_dataclasses(args=argv)
    shape_name, shape = load_shape(args.shape)
    # Unset settings from the shape, resolved here so that every child gets the same values.
    if args.dtype is None:
        args.dtype = "bfloat16" if _cuda_available() else "float32"
    args.batch_size = args.batch_size or shape["batch_size"]
    args.seq_len = args.seq_len or shape["seq_len"]
    args.lora_r = args.lora_r or shape.get("lora_r", 128)
    args.lora_alpha = args.lora_alpha or shape.get("lora_alpha", 256)
    if args.peer_trainer not in ("sft", "trainer"):
        raise SystemExit(f"--peer_trainer {args.peer_trainer!r}: choose sft or trainer.")
    if args.plan_only:
        print_plans(args, shape_name, shape)
        return
    if args.child:
        kind, _, recipe = args.child.partition(":")
        if kind == "build":
            build = build_native if is_native(shape) else build_base
            build(base_dir(shape_name, shape, args.dtype, args.workdir), shape, args.dtype)
            return
        print(RESULT + json.dumps(run_side(args, kind, recipe)), flush=True)
        return

    if args.warmup_steps < 1 or args.steps < 1:
        raise SystemExit("--warmup_steps and --steps must be at least 1: a step is timed from the end of the one before.")
    recipes = list(RECIPES) if args.recipe == "all" else [args.recipe]
    if any(r not in RECIPES for r in recipes):
        raise SystemExit(f"--recipe {args.recipe!r}: choose {', '.join(RECIPES)} or all.")
    base = base_dir(shape_name, shape, args.dtype, args.workdir)
    if not os.path.isfile(os.path.join(base, "complete")):
        _child(args, "build")

    sides = ["ours", "peer"] if args.peer else ["ours"]
    results = {(r, s): [] for r in recipes for s in sides}
    for recipe in recipes:
        for _ in range(args.repeats):
            for side in sides:  # alternated: ours, peer, ours, peer, ...
                results[recipe, side].append(_child(args, f"{side}:{recipe}"))
    print_table(args, shape_name, shape, results)


def print_table(args: BenchArguments, shape_name: str, shape: dict, results: dict) -> None:
    """The heading line, a row per recipe and side (medians), then the ours/peer ratios."""
    recipes = list(dict.fromkeys(recipe for recipe, _ in results))
    everything = [r for runs in results.values() for r in runs]
    device_flops = max(r["device_flops"] for r in everything)
    first = everything[0]
    batch, seq = first["batch_size"], first["seq_len"]
    load = os.getloadavg()
    peer_model = f"the same {shape['model_type']} model" if is_native(shape) else "LlavaForConditionalGeneration"
    print(
        f"bench: shape {shape_name}, batch {batch} x {seq} tokens, {args.images} image(s)/sample, "
        f"{first['dtype']} on {first['device']} ({_device_name()}), {args.threads} thread(s), "
        f"warm-up {args.warmup_steps} + {args.steps} timed steps, {args.repeats} process(es) per side "
        f"(medians), gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
        f"peer {'TRL SFTTrainer' if args.peer_trainer == 'sft' else 'transformers Trainer'} + "
        f"{peer_model}, device peak {device_flops / 1e9:.1f} GFLOP/s, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(HEADER)
    # The same weights train on both sides; a native model's tower too (nothing of it is cut off).
    parts = ("vision", "connector", "llm") if is_native(shape) else ("connector", "llm")
    ratios = []
    for recipe in recipes:
        ours = results[recipe, "ours"]
        summary = {side: summarize(results[recipe, side], device_flops) for side in ("ours", "peer") if args.peer or side == "ours"}
        if args.peer:
            ours_counts, peer_counts = ours[0]["counts"], results[recipe, "peer"][0]["counts"]
            for part in parts:
                if ours_counts[part] != peer_counts[part]:
                    raise SystemExit(f"{recipe}: {part} trainable/total {ours_counts[part]} (ours) vs "
                                     f"{peer_counts[part]} (peer): the sides do not train the same model.")
        for side, s in summary.items():
            print(format_row(recipe, side, s, ours[0]["flops"]["total"], ours[0]["plan_total"], ours[0]["plan_step"]))
        if args.peer:
            ratios.append(
                f"{recipe} ours/peer step-time {summary['ours']['step_s'] / summary['peer']['step_s']:.3f} "
                f"memory {summary['ours']['peak_mib'] / summary['peer']['peak_mib']:.3f} "
                f"rss {summary['ours']['rss_mib'] / summary['peer']['rss_mib']:.3f}"
            )
    for line in ratios:
        print(line)


def print_plans(args: BenchArguments, shape_name: str, shape: dict) -> None:
    """Each recipe's plan for the shape's batch, built on the meta device from its configs alone."""
    from model.build import build_model
    from model.freeze import apply_freeze_policy
    from tools.memory import plan_memory

    configs = os.path.join(work_dir(args.workdir), f"{shape_name}-configs")
    image_tokens = image_tokens_per_image(shape)
    if is_native(shape):  # config.json and the processor, which makes the batch: its answer is labelled
        processor = native_processor(shape)
        native_config(shape, processor.tokenizer).save_pretrained(configs)
        processor.save_pretrained(configs)
        batch = native_samples(configs, shape, args.batch_size, args.seq_len, args.images, shape["llm"]["vocab_size"])
        supervised = int((batch["labels"][:, 1:] != -100).sum())
    else:
        write_configs(configs, shape)
        supervised = supervised_positions(args.batch_size, args.seq_len, args.images, image_tokens)
    print(f"plan: shape {shape_name}, batch {args.batch_size} x {args.seq_len} tokens, {args.images} image(s) of "
          f"{image_tokens} tokens/sample, {supervised} labelled positions, {args.dtype}, AdamW, MiB per device")
    print(f"{'recipe':<11} {'weights':>9} {'grads':>9} {'adamw':>9} {'act_off':>9} {'act_on':>9} {'total_off':>9} {'total_on':>9}")
    recipes = list(RECIPES) if args.recipe == "all" else [args.recipe]
    for recipe in recipes:
        model_args = model_args_of(args, configs, recipe, shape)
        model = build_model(model_args, weights=False)  # a released VLM when model_args.vlm_model is set
        apply_freeze_policy(model, model_args)
        plan = plan_memory(model, args.batch_size, args.seq_len, False, images_per_sample=args.images,
                           supervised_tokens=supervised, padded=False)
        fixed = plan.weights_total + plan.gradients + plan.optimizer
        print(f"{recipe:<11} " + " ".join(
            f"{value / MIB:>9.1f}" for value in (plan.weights_total, plan.gradients, plan.optimizer,
                                                 plan.activations_no_ckpt, plan.activations_ckpt)
        ) + f" {(fixed + plan.activations_no_ckpt) / MIB:>9.1f} {(fixed + plan.activations_ckpt) / MIB:>9.1f}")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    from cli import run_main

    run_main(main)
