"""Training speed, model FLOPs, MFU and peak memory of a recipe; with --peer, against what a user
would pick instead: transformers' LlavaForConditionalGeneration trained by TRL's SFTTrainer.

    python -m bench.training --peer                        # cpu_small, every recipe: rows + ours/peer
    python -m bench.training --recipe lora                 # one row, ours only
    python -m bench.training --shape siglip_so400m_qwen25_05b --peer     # on a GPU (bf16)
    python -m bench.training --peer --peer_trainer trainer # the peer through transformers' Trainer
    python -m bench.training --shape siglip_so400m_qwen25_05b --dtype bfloat16 --plan_only  # no weights
    python -m bench.training --shape cpu_qwen25vl --peer   # native: one released Qwen2.5-VL, both sides

(from the repository's root, as every benchmark runs). The recipes (`--recipe`) are
bench/arguments.py's, each one of fixtures/recipes.py's.

A shape (configs/shapes/NAME.yaml) is a vision config and an LLM config (or one released model's,
`kind: native`) and a default batch, built once with random weights and saved with
save_pretrained (bench/shapes.py), so both sides load through from_pretrained as a real
run does and their losses agree (the table prints both sides' first loss and mean training loss).
The sides are built in bench/sides.py, each in its own process (bench/side_process.py), measured
with bench/measure.py.

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
tensor bytes that the memory step allocates on top of them (fixtures/tensor_peak.py). Peak RSS
(VmHWM) is read before the memory step, whose profiler allocates too. The plan is our model's
`--dry_run` plan (`plan_memory`) for the same batch (--plan_only: bench/plans.py). The device's
peak FLOP/s is a large matmul (fp32 on a CPU, bf16 on a GPU) timed in every process; the best
counts.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys

if __package__ in (None, ""):  # run by its path: bench/ is then sys.path[0], and `bench` no package
    sys.exit("Run the benchmarks as modules, from the repository's root: python -m bench.training --help")

from transformers import HfArgumentParser  # noqa: E402

from bench.arguments import BenchArguments  # noqa: E402
from bench.native_shapes import build_native  # noqa: E402
from bench.plans import print_plans  # noqa: E402
from bench.shapes import base_dir, build_base, is_native, load_shape  # noqa: E402
from bench.side_process import run_side  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = "BENCH_RESULT "
MIB = 2**20


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
    out = subprocess.run([sys.executable, "-m", "bench.training", *_words(args, child=what)],
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
    args.resolve(shape, cuda=_cuda_available())
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
    base = base_dir(shape_name, shape, args.dtype, args.workdir)
    if not os.path.isfile(os.path.join(base, "complete")):
        _child(args, "build")

    sides = ["ours", "peer"] if args.peer else ["ours"]
    results = {(r, s): [] for r in args.recipes for s in sides}
    for recipe in args.recipes:
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


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    from cli import run_main

    run_main(main)
