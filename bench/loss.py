"""Our fused LM head + cross-entropy (model/loss.py) against the libraries' (issue 14): torch's
`torch.nn.functional.linear_cross_entropy` on its chunked path (`options=LinearCrossEntropyOptions(...)`,
default options and a sweep of `batch_chunk_size`), TRL's chunked LM-head loss (SFTTrainer's
`loss_type="chunked_nll"`, in TRL 1.16 a deprecated alias of "nll": `add_fused_lm_head` ->
`trl.kernels.ChunkedLogProbFunction`) and the unfused reference (the head, then `cross_entropy`).

    python -m bench.loss                           # 1,024 rows, hidden 896, vocab 4,096 and 151,936
    python -m bench.loss --vocabs 151936 --torch_chunks 64 256
    python -m bench.loss --plan                    # the GPU plan only: computed, nothing run
    python -m bench.loss --bf16                    # bf16 losses and gradients against float64

Same batch for every method: seeded hidden states [N, D] (requiring grad), an nn.Linear head
[V, D] without bias (requiring grad), labels with about --ignore_frac of them -100, fp32.
Every method runs in a fresh process of its own (`--worker`, bench/loss_methods.py; `--rounds` more
of them, interleaved with the other methods'), so its peak RSS is its own. In it: the imports, one step on a tiny batch
(what the method imports lazily, the code it pages in), the inputs, then the RSS (`base`); then
--warmup untimed and --repeats timed forward + backward steps. The table shows the median wall
time (`time_s`), the fastest (`min_s`) and the median process CPU time (`cpu_s`; other processes
on a shared machine inflate it much less than wall time); the process's peak RSS (`peak_rss`:
VmHWM, the high-water mark `ru_maxrss` reads, without the parent's peak that a child's
`ru_maxrss` inherits across fork + exec) and peak - base (`delta_rss`). One more step runs under
the profiler: the peak of tensor bytes it allocates (`tensor_peak`; allocations only, not RSS:
glibc keeps freed blocks resident and the first step pages in libtorch code).

Correctness: "ours" runs first at each vocabulary and stores its loss and gradients; every other
method compares its own to them: `loss_diff` = |loss - ours|, `grad_diff` = the largest
|grad - ours| over the hidden states' and the head's gradients, divided by the largest |ours|
of that gradient; `match` says whether both are within --rtol.

--plan (bench/loss_gpu_plan.py): what each method holds at the GPU shape (5,272 labelled rows, hidden 896 and 1,536,
vocab 151,936, bf16), computed from the code's constants (model/loss.py's CHUNK_ELEMENTS, torch's
`LinearCrossEntropyOptions` chunking, TRL's tile sizes), nothing measured.

--bf16 (bench/loss_bf16.py): what the fp32 table cannot show, each method's loss and gradients in bf16 (bf16 weights,
and fp32 weights under bf16 autocast) against float64, in this process, at a small size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):  # run by its path: bench/ is then sys.path[0], and `bench` no package
    sys.exit("Run the benchmarks as modules, from the repository's root: python -m bench.loss --help")

from bench.loss_bf16 import print_bf16  # noqa: E402
from bench.loss_gpu_plan import print_plan  # noqa: E402
from bench.loss_methods import METHODS, worker  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = (
    "vocab", "method", "chunk", "time_s", "min_s", "cpu_s", "base_rss_mib", "peak_rss_mib", "delta_rss_mib", "tensor_peak_mib",
    "loss", "loss_diff", "grad_diff", "match",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1024, help="N: rows (positions) scored.")
    p.add_argument("--hidden", type=int, default=896, help="D: hidden size (Qwen2.5-0.5B's).")
    p.add_argument("--vocabs", type=int, nargs="+", default=[4096, 151936], help="V: vocabularies measured.")
    p.add_argument("--ignore_frac", type=float, default=0.1, help="Fraction of labels set to -100.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every worker.")
    p.add_argument("--warmup", type=int, default=1, help="Untimed steps first.")
    p.add_argument("--repeats", type=int, default=3, help="Timed steps (median shown).")
    p.add_argument("--rounds", type=int, default=1,
                   help="Processes per method, interleaved (every method, then again): on a shared machine, "
                        "drift in the other load falls on every method alike.")
    p.add_argument("--max_timed_s", type=float, default=60.0,
                   help="Fewer timed steps (at least 1) where --repeats of the warm-up's length would pass this.")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--torch_chunks", type=int, nargs="*", default=None,
                   help="batch_chunk_size values swept for torch (default: ours' chunk rows and 64..512, "
                        "powers of 2, up to --rows, less the default options' own).")
    p.add_argument("--trl_vocab_chunk", type=int, default=0,
                   help="TRL's tile width (default: its own, patches.trl_chunk_size, cut to the vocabulary).")
    p.add_argument("--no_tensor_peak", action="store_true", help="Skip the profiled step.")
    p.add_argument("--rtol", type=float, default=1e-4, help="Tolerance of loss_diff (relative) and grad_diff.")
    p.add_argument("--plan", action="store_true", help="Print the GPU plan only (computed, nothing run).")
    p.add_argument("--plan_rows", type=int, default=5272, help="Labelled rows of the GPU plan.")
    p.add_argument("--plan_hiddens", type=int, nargs="+", default=[896, 1536], help="Hidden sizes of the GPU plan.")
    p.add_argument("--plan_vocab", type=int, default=151936)
    p.add_argument("--bf16", action="store_true", help="Print the bf16 accuracy check only (in this process).")
    p.add_argument("--bf16_rows", type=int, default=2048)
    p.add_argument("--bf16_hidden", type=int, default=64)
    p.add_argument("--bf16_vocab", type=int, default=8192)
    p.add_argument("--bf16_chunk", type=int, default=64)
    # Internal: one method in this process.
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--ref", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def torch_candidates(args, ours_rows: int, default_rows: int) -> list[int]:
    """batch_chunk_size values swept: ours' chunk rows (the same logits memory as ours) and 64..512
    in powers of 2, up to --rows, less what the default options resolve to (measured already)."""
    sizes = args.torch_chunks if args.torch_chunks is not None else [ours_rows] + [2**k for k in range(6, 10)]
    return sorted({min(size, args.rows) for size in sizes} - {default_rows})


def run_worker(args, method: str, vocab: int, ref: str, chunk: int = 0, profile: bool = True) -> dict:
    command = [
        sys.executable, "-m", "bench.loss", "--worker", method, "--vocab", str(vocab), "--ref", ref,
        "--rows", str(args.rows), "--hidden", str(args.hidden), "--ignore_frac", str(args.ignore_frac),
        "--seed", str(args.seed), "--threads", str(args.threads), "--warmup", str(args.warmup),
        "--repeats", str(args.repeats), "--max_timed_s", str(args.max_timed_s), "--rtol", str(args.rtol),
        "--chunk", str(chunk), "--trl_vocab_chunk", str(args.trl_vocab_chunk),
    ] + (["--no_tensor_peak"] if args.no_tensor_peak or not profile else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{method} at vocab {vocab} failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _fmt(value, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.{digits}e}" if digits < 0 else f"{value:.{digits}f}"
    return str(value)


def format_row(r: dict) -> str:
    cells = [
        str(r["vocab"]), r["method"], str(r["chunk"]), _fmt(r["time_s"], 3), _fmt(r["min_s"], 3), _fmt(r["cpu_s"], 3), _fmt(r["base_rss_mib"], 1), _fmt(r["peak_rss_mib"], 1),
        _fmt(r["delta_rss_mib"], 1), _fmt(r["tensor_peak_mib"], 1), _fmt(r["loss"], 5),
        f"{r['loss_diff']:.1e}", f"{r['grad_diff']:.1e}", _fmt(r["match"], 0),
    ]
    return "| " + " | ".join(cells) + " |"


def merge(runs: list[dict]) -> dict:
    """One row from the same method's processes in every round: the median and the fastest of all
    their timed steps, the largest peaks, the first round's tensor peak (the only one profiled)."""
    row = dict(runs[0])
    times = [t for r in runs for t in r["times"]]
    row.update(
        time_s=statistics.median(times),
        min_s=min(times),
        cpu_s=statistics.median([t for r in runs for t in r["cpu_times"]]),
        peak_rss_mib=max(r["peak_rss_mib"] for r in runs),
        delta_rss_mib=max(r["delta_rss_mib"] for r in runs),
        loss_diff=max(r["loss_diff"] for r in runs),
        grad_diff=max(r["grad_diff"] for r in runs),
        match=all(r["match"] for r in runs),
        processes=len(runs),
    )
    return row


def measure(args) -> None:
    print(
        f"# rows {args.rows}, hidden {args.hidden}, fp32, {args.threads} threads, {args.rounds} round(s) of one "
        f"process per method, each {args.warmup} warm-up + {args.repeats} timed steps (forward + backward); "
        f"labels -100 at {args.ignore_frac:.0%}; rtol {args.rtol:g}; load average at the start {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS), flush=True)
    summaries = []
    started = time.time()
    with tempfile.TemporaryDirectory() as folder:
        for vocab in args.vocabs:
            ref = os.path.join(folder, f"ours_{vocab}.pt")
            runs: dict[tuple[str, int], list[dict]] = {}
            # ours first (the reference), then torch's defaults (their chunk is left out of the sweep).
            order = ["ours"] + [m for m in ("torch_default",) if m in args.methods]
            order += [m for m in args.methods if m not in order]
            for round_ in range(args.rounds):
                for method in order:
                    if method == "torch_chunk":
                        default_rows = runs[("torch_default", 0)][0]["chunk"] if ("torch_default", 0) in runs else 0
                        chunks = torch_candidates(args, runs[("ours", 0)][0]["chunk"], default_rows)
                    else:
                        chunks = [0]
                    for chunk in chunks:
                        result = run_worker(args, method, vocab, ref, chunk=chunk, profile=round_ == 0)
                        runs.setdefault((method, chunk), []).append(result)
                        print(f"# round {round_ + 1}: {format_row(result)}", file=sys.stderr, flush=True)
            results = [merge(group) for group in runs.values()]
            for result in results:
                print(format_row(result), flush=True)
            summaries.append(summary(vocab, results))
    print()
    for line in summaries:
        print(line)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"# {time.time() - started:.0f} s in all; load average at the end (1, 5, 15 min): {load}")


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "-"


def summary(vocab: int, results: list[dict]) -> str:
    """One line per vocabulary: each method's CPU time and delta_rss over ours' (CPU time: on a
    shared machine wall time follows the other load); torch tuned = its cheapest chunk in CPU time."""
    by = {r["method"]: r for r in results if r["method"] != "torch_chunk"}
    sweep = [r for r in results if r["method"].startswith("torch_")]
    ours = by["ours"]
    parts = [f"vocab {vocab}: ours {ours['cpu_s']:.3f} CPU s ({ours['time_s']:.3f} s), delta_rss {ours['delta_rss_mib']:.0f} MiB"]

    def ratios(name: str, r: dict) -> str:
        return (f"{name}/ours cpu {_ratio(r['cpu_s'], ours['cpu_s'])}, "
                f"delta_rss {_ratio(r['delta_rss_mib'], ours['delta_rss_mib'])}")

    if sweep:
        best = min(sweep, key=lambda r: (r["cpu_s"], r["delta_rss_mib"]))
        parts.append(ratios(f"torch tuned (batch_chunk_size {best['chunk']})", best))
    for name in ("torch_default", "trl_sft", "trl_nll", "unfused"):
        if name in by:
            parts.append(ratios(name, by[name]))
    return "; ".join(parts)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
    elif args.plan:
        print_plan(args)
    elif args.bf16:
        print_bf16(args)
    else:
        measure(args)


if __name__ == "__main__":
    main()
