"""Our fused LM head + cross-entropy (model/loss.py) against the libraries' (issue 14): torch's
`torch.nn.functional.linear_cross_entropy` on its chunked path (`options=LinearCrossEntropyOptions(...)`,
default options and a sweep of `batch_chunk_size`), TRL's chunked LM-head loss (SFTTrainer's
`loss_type="chunked_nll"`, in TRL 1.16 a deprecated alias of "nll": `add_fused_lm_head` ->
`trl.kernels.ChunkedLogProbFunction`) and the unfused reference (the head, then `cross_entropy`).

    python -m scripts.bench_loss                           # 1,024 rows, hidden 896, vocab 4,096 and 151,936
    python -m scripts.bench_loss --vocabs 151936 --torch_chunks 64 256
    python -m scripts.bench_loss --plan                    # the GPU plan only: computed, nothing run
    python -m scripts.bench_loss --bf16                    # bf16 losses and gradients against float64

Same batch for every method: seeded hidden states [N, D] (requiring grad), an nn.Linear head
[V, D] without bias (requiring grad), labels with about --ignore_frac of them -100, fp32.
Every method runs in a fresh process of its own (`--worker`; `--rounds` more of them, interleaved
with the other methods'), so its peak RSS is its own. In it: the imports, one step on a tiny batch
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

--plan: what each method holds at the GPU shape (5,272 labelled rows, hidden 896 and 1,536,
vocab 151,936, bf16), computed from the code's constants (model/loss.py's CHUNK_ELEMENTS, torch's
`LinearCrossEntropyOptions` chunking, TRL's tile sizes), nothing measured.

--bf16: what the fp32 table cannot show, each method's loss and gradients in bf16 (bf16 weights,
and fp32 weights under bf16 autocast) against float64, in this process, at a small size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IGNORE_INDEX = -100
# SFTTrainer patches the model with add_fused_lm_head(..., outputs=SFT_OUTPUTS) (trl/trainer/sft_trainer.py):
# the loss's log-probabilities, plus entropy and top-1 for its logged metrics.
SFT_OUTPUTS = ("log_probs", "entropy", "is_top1")
METHODS = ("ours", "torch_default", "torch_chunk", "trl_sft", "trl_nll", "unfused")
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


# ----------------------------------------------------------------------------------- the worker


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _tensor_peak(step) -> int:
    """Peak of tensor bytes allocated during `step()` on top of what was live before it (the
    profiler's "Total Allocated", as scripts/bench_measure.py's StepMemory counts a CPU step)."""
    import torch

    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    with profiler:
        step()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        profiler.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    return max((e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"), default=0)


def make_inputs(rows: int, hidden_size: int, vocab: int, ignore_frac: float, seed: int):
    """The seeded batch: hidden [N, D] requiring grad, nn.Linear head [V, D] (no bias), labels [N]."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    head = nn.Linear(hidden_size, vocab, bias=False)
    generator = torch.Generator().manual_seed(seed + 1)
    hidden = torch.randn(rows, hidden_size, generator=generator).requires_grad_()
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    labels[torch.rand(rows, generator=generator) < ignore_frac] = IGNORE_INDEX
    return hidden, head, labels


def loss_function(method: str, hidden, head, labels, chunk: int, trl_vocab_chunk: int):
    """A closure computing the mean cross-entropy over the labelled rows, by `method`."""
    import torch.nn.functional as F

    if method == "ours":
        from model.loss import linear_cross_entropy

        return lambda: linear_cross_entropy(hidden, head, labels)
    if method in ("torch_default", "torch_chunk"):
        from torch.nn import LinearCrossEntropyOptions

        options = LinearCrossEntropyOptions() if method == "torch_default" else LinearCrossEntropyOptions(batch_chunk_size=chunk)
        return lambda: F.linear_cross_entropy(
            hidden, head.weight, labels, linear_bias=head.bias, reduction="mean", ignore_index=IGNORE_INDEX, options=options
        )
    if method in ("trl_sft", "trl_nll"):
        from trl.kernels import ChunkedLogProbFunction

        from patches import trl_uses_triton

        outputs = SFT_OUTPUTS if method == "trl_sft" else ("log_probs",)

        def trl_loss():
            # add_fused_lm_head's fused forward (trl/trainer/utils.py), past the backbone: only the
            # labelled rows where Triton runs (CUDA, XPU), every row with clamped labels elsewhere.
            mask = labels != IGNORE_INDEX
            compact = trl_uses_triton(hidden.device)
            per_token = ChunkedLogProbFunction.apply(
                hidden[mask] if compact else hidden,
                head.weight,
                head.bias,
                labels[mask] if compact else labels.clamp(min=0),
                1.0,  # temperature
                trl_vocab_chunk,
                None,  # final_logit_softcapping
                1.0,  # logit_scale
                outputs,
            )
            log_probs = per_token[0]
            if compact:
                log_probs = log_probs.new_zeros(mask.shape).masked_scatter(mask, log_probs)
            else:
                log_probs = log_probs.masked_fill(~mask, 0)
            return -log_probs.sum() / mask.sum().clamp(min=1)

        return trl_loss
    if method == "unfused":
        return lambda: F.cross_entropy(head(hidden).float(), labels, ignore_index=IGNORE_INDEX)
    raise ValueError(method)


def resolved_chunk(method: str, args, rows: int, hidden_size: int, vocab: int) -> int:
    """Rows per chunk (TRL: vocabulary columns per tile) that `method` runs with at this shape."""
    import torch

    if method == "ours":
        import model.loss

        return min(rows, max(1, model.loss.CHUNK_ELEMENTS // vocab))
    if method == "torch_default":
        from patches import torch_default_chunk_rows

        return torch_default_chunk_rows(rows, hidden_size, vocab, torch.float32, torch.device("cpu"))
    if method == "torch_chunk":
        return min(args.chunk, rows)
    if method in ("trl_sft", "trl_nll"):
        return args.trl_vocab_chunk
    return rows  # unfused: all rows at once


def timed_steps(step, args) -> tuple[dict, object]:
    """Warm-up steps, then the timed ones (fewer when a step is slow): wall and CPU seconds."""
    started = time.perf_counter()
    for _ in range(args.warmup):
        step()
    warmup_s = (time.perf_counter() - started) / max(1, args.warmup)
    repeats = args.repeats
    if warmup_s * repeats > args.max_timed_s:
        repeats = max(1, int(args.max_timed_s // max(warmup_s, 1e-9)))
    times, cpu_times = [], []
    for _ in range(repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        loss = step()
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
    timing = {"time_s": statistics.median(times), "times": times, "cpu_times": cpu_times,
              "cpu_s": statistics.median(cpu_times), "min_s": min(times), "warmup_s": warmup_s}
    return timing, loss


def compare_with_ours(args, loss, grads: dict) -> dict:
    """Ours saves its loss and gradients as the reference; every other method is measured
    against them (the gradients relative to their largest value)."""
    import torch

    if args.worker == "ours":
        torch.save({"loss": loss, **grads}, args.ref)
        return {"loss_diff": 0.0, "grad_diff": 0.0}
    ref = torch.load(args.ref)
    return {
        "loss_diff": abs(float(loss) - float(ref["loss"])),
        "grad_diff": max(
            float((grads[name] - ref[name]).abs().max() / ref[name].abs().max().clamp(min=1e-30)) for name in grads
        ),
    }


def worker(args) -> None:
    import resource

    import torch

    torch.set_num_threads(args.threads)
    if args.worker.startswith("trl_") and not args.trl_vocab_chunk:
        args.trl_vocab_chunk = trl_vocab_chunk(args.vocab)
    # One step of the method on a tiny batch first: it imports what the method imports lazily (TRL's
    # backward imports trl.trainer.utils, i.e. transformers' Trainer stack, ~300 MiB of code), pages
    # in the kernels it runs and starts the thread pool, so that the base RSS below counts the code
    # and delta_rss the step.
    tiny_vocab = min(args.vocab, 256)
    tiny = make_inputs(min(args.rows, 16), args.hidden, tiny_vocab, args.ignore_frac, args.seed)
    loss_function(args.worker, *tiny, args.chunk, min(args.trl_vocab_chunk, tiny_vocab))().backward()
    del tiny

    hidden, head, labels = make_inputs(args.rows, args.hidden, args.vocab, args.ignore_frac, args.seed)
    loss_fn = loss_function(args.worker, hidden, head, labels, args.chunk, args.trl_vocab_chunk)

    def step():
        hidden.grad = None
        head.weight.grad = None
        loss = loss_fn()
        loss.backward()
        return loss.detach()

    base = _rss_bytes()
    timing, loss = timed_steps(step, args)
    # This process's high-water RSS (VmHWM). Not ru_maxrss: Linux keeps in it the peak of the
    # memory the process had before exec, here a copy of the parent's (which may hold torch and
    # transformers), so a child's ru_maxrss can report its parent's peak instead of its own.
    peak = _vm_hwm_bytes()
    ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    tensor_peak = None
    if not args.no_tensor_peak:
        hidden.grad = head.weight.grad = None
        tensor_peak = _tensor_peak(step)

    result = {
        "vocab": args.vocab,
        "method": args.worker,
        "chunk": resolved_chunk(args.worker, args, args.rows, args.hidden, args.vocab),
        **timing,
        "base_rss_mib": base / 2**20,
        "peak_rss_mib": peak / 2**20,
        "ru_maxrss_mib": ru_maxrss / 2**20,
        "delta_rss_mib": (peak - base) / 2**20,
        "tensor_peak_mib": None if tensor_peak is None else tensor_peak / 2**20,
        "loss": float(loss),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    result.update(compare_with_ours(args, loss, {"hidden": hidden.grad.detach(), "weight": head.weight.grad.detach()}))
    result["match"] = bool(
        result["loss_diff"] <= args.rtol * max(1.0, abs(result["loss"])) and result["grad_diff"] <= args.rtol
    )
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------- the table


def torch_candidates(args, ours_rows: int, default_rows: int) -> list[int]:
    """batch_chunk_size values swept: ours' chunk rows (the same logits memory as ours) and 64..512
    in powers of 2, up to --rows, less what the default options resolve to (measured already)."""
    sizes = args.torch_chunks if args.torch_chunks is not None else [ours_rows] + [2**k for k in range(6, 10)]
    return sorted({min(size, args.rows) for size in sizes} - {default_rows})


def trl_vocab_chunk(vocab: int) -> int:
    """TRL's tile width (trl/trainer/utils.py), cut to the vocabulary as scripts/bench.py cuts it
    for its TRL peer: wider, the tile's extra columns are allocated and never written."""
    from patches import trl_chunk_size

    return min(trl_chunk_size(), vocab)


def run_worker(args, method: str, vocab: int, ref: str, chunk: int = 0, profile: bool = True) -> dict:
    command = [
        sys.executable, "-m", "scripts.bench_loss", "--worker", method, "--vocab", str(vocab), "--ref", ref,
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


# ----------------------------------------------------------------------------------- the GPU plan


def plan_rows(n: int, d: int, v: int) -> list[dict]:
    """Per method, at n labelled rows, hidden d, vocab v, bf16 on a CUDA GPU (SM 8.0+), from the code:

    - ours (model/loss.py): C = CHUNK_ELEMENTS // V rows a chunk; a chunk holds its [C, V] logits
      in bf16 and their fp32 upcast at once (then the fp32 gradient and its bf16 copy): 6 B/element.
      Head gradient: an fp32 [V, D] accumulator, each chunk's bf16 [V, D] product added into it,
      cast to bf16 at the end.
    - torch (`LinearCrossEntropyOptions()`: acc_policy auto -> "compact" on CUDA, acc_dtype -> fp32
      for bf16 at SM 8.0+): a [B, V] fp32 logits buffer and its bf16 downcast (input- and
      weight-gradient matmuls): 6 B/element; the head gradient accumulates in bf16 (addmm_ into the
      [V, D] bf16 result, chunk by chunk). B from its chunking heuristic (patches.torch_default_chunk_rows).
    - TRL (ChunkedLogProbFunction with Triton): one [min(N, TOKEN_CHUNK_SIZE), chunk_size] tile in
      the compute dtype (bf16), folded in place by its kernels; fp32 accumulators for the hidden
      states' and head's gradients; the backward recomputes every tile (4 head matmuls, not 3).
    - unfused: [N, V] bf16 logits, their fp32 upcast and the fp32 log-probabilities in the forward;
      the fp32 gradient of the log-probabilities and its bf16 cast in the backward (10 B/element).

    GFLOP: the head's matmuls (2NVD each: 3, or 4 where the backward recomputes the logits).
    [V, D] operand passes: every head matmul over a chunk of rows streams one [V, D] operand (the
    weight, or the weight-gradient accumulator) through memory; counted at 2 bytes an element.
    Small chunks make the head memory-bound on a GPU: the weight is re-read for every chunk.
    """
    import torch
    from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE

    import model.loss
    from patches import torch_default_chunk_rows, trl_chunk_size

    mib = 2**20
    rows = []
    c_ours = max(1, model.loss.CHUNK_ELEMENTS // v)
    rows.append(dict(method="ours", chunk=f"{min(c_ours, n)} rows", chunks=math.ceil(n / c_ours),
                     logits_mib=min(c_ours, n) * v * 6 / mib, vd_mib=v * d * (4 + 2) / mib,
                     vd_note="fp32 acc + bf16 product/chunk", weight_passes=3 * math.ceil(n / c_ours), head_matmuls=3))
    # device=None resolves acc_policy to "compact", the CUDA pick for bf16; the chunk heuristic is device-independent.
    b_default = torch_default_chunk_rows(n, d, v, torch.bfloat16, None)
    for label, b in (("torch_default", b_default), ("torch_chunk (= ours' rows)", min(c_ours, n))):
        rows.append(dict(method=label, chunk=f"{b} rows", chunks=math.ceil(n / b), logits_mib=b * v * 6 / mib,
                         vd_mib=v * d * 2 / mib, vd_note="bf16 result, accumulated in bf16",
                         weight_passes=3 * math.ceil(n / b), head_matmuls=3))
    tile_cols = min(trl_chunk_size(), v)
    token_chunks = math.ceil(n / TOKEN_CHUNK_SIZE)
    rows.append(dict(method="trl", chunk=f"{min(n, TOKEN_CHUNK_SIZE)} x {tile_cols} tile",
                     chunks=token_chunks * math.ceil(v / tile_cols),
                     logits_mib=min(n, TOKEN_CHUNK_SIZE) * tile_cols * 2 / mib, vd_mib=v * d * (4 + 2) / mib,
                     vd_note="fp32 acc + bf16 cast", weight_passes=4 * token_chunks, head_matmuls=4))
    rows.append(dict(method="unfused", chunk=f"{n} rows", chunks=1, logits_mib=n * v * 10 / mib,
                     vd_mib=v * d * 2 / mib, vd_note="bf16", weight_passes=3, head_matmuls=3))
    for r in rows:
        r.update(rows_n=n, hidden=d, vocab=v, gflop=r["head_matmuls"] * 2 * n * v * d / 1e9,
                 weight_gib=r["weight_passes"] * v * d * 2 / 2**30)
    return rows


def print_plan(args) -> None:
    print(f"# GPU plan: {args.plan_rows} labelled rows, vocab {args.plan_vocab}, bf16, CUDA SM 8.0+ (computed, not measured)")
    print("| hidden | method | chunk | chunks | logits held MiB | [V, D] head-grad buffers MiB | head matmul GFLOP | [V, D] operand passes GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for d in args.plan_hiddens:
        for r in plan_rows(args.plan_rows, d, args.plan_vocab):
            print(f"| {d} | {r['method']} | {r['chunk']} | {r['chunks']} | {r['logits_mib']:.1f} | "
                  f"{r['vd_mib']:.0f} ({r['vd_note']}) | {r['gflop']:.0f} | {r['weight_gib']:.1f} |")


# ----------------------------------------------------------------------------------- bf16 accuracy


def bf16_accuracy(args) -> list[dict]:
    """Each method in bf16 against float64 on the same bf16-rounded operands: the loss it returns
    (its dtype and its error) and the relative error (Frobenius) of the head's and the hidden
    states' gradients. Two precisions: bf16 weights, and fp32 weights under bf16 autocast (the
    Trainer's --bf16). In this process, small: --bf16_rows x --bf16_hidden x --bf16_vocab, every
    chunked method at the same --bf16_chunk rows (ours through CHUNK_ELEMENTS), torch's defaults
    too. What differs is where the chunks' head gradients are summed: ours and TRL in fp32, torch
    in the input dtype."""
    import torch
    import torch.nn.functional as F

    import model.loss

    torch.set_num_threads(args.threads)
    n, d, v, c = args.bf16_rows, args.bf16_hidden, args.bf16_vocab, args.bf16_chunk
    hidden0, head, labels = make_inputs(n, d, v, args.ignore_frac, args.seed)
    hidden0 = hidden0.detach()
    model.loss.CHUNK_ELEMENTS = c * v  # ours at --bf16_chunk rows, as torch_chunk
    rows = []
    for precision in ("bf16 weights", "fp32 weights, bf16 autocast"):
        autocast = precision.endswith("autocast")
        # float64 on the operands the bf16 matmuls see
        h64 = hidden0.bfloat16().double().requires_grad_()
        w64 = head.weight.detach().bfloat16().double().requires_grad_()
        ref_loss = F.cross_entropy(h64 @ w64.T, labels, ignore_index=IGNORE_INDEX)
        ref_loss.backward()
        for method in ("ours", "torch_default", "torch_chunk", "trl_nll", "unfused"):
            dtype = torch.float32 if autocast else torch.bfloat16
            hidden = hidden0.to(dtype).clone().requires_grad_()
            method_head = torch.nn.Linear(d, v, bias=False).to(dtype)
            method_head.weight.data.copy_(head.weight.detach())
            fn = loss_function(method, hidden, method_head, labels, c, min(v, 32768))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = fn()
            loss.backward()
            rows.append({
                "precision": precision,
                "method": method,
                "loss_dtype": str(loss.dtype).replace("torch.", ""),
                "loss_err": abs(float(loss.detach()) - float(ref_loss.detach())),
                "weight_grad_err": float((method_head.weight.grad.double() - w64.grad).norm() / w64.grad.norm()),
                "hidden_grad_err": float((hidden.grad.double() - h64.grad).norm() / h64.grad.norm()),
                "weight_grad_dtype": str(method_head.weight.grad.dtype).replace("torch.", ""),
            })
    return rows


def print_bf16(args) -> None:
    print(f"# bf16 accuracy: {args.bf16_rows} rows, hidden {args.bf16_hidden}, vocab {args.bf16_vocab}, "
          f"chunks of {args.bf16_chunk} rows (torch_default: its own), against float64")
    print("| precision | method | loss dtype | abs loss error | head grad rel error | hidden grad rel error |")
    print("|---|---|---|---|---|---|")
    for r in bf16_accuracy(args):
        print(f"| {r['precision']} | {r['method']} | {r['loss_dtype']} | {r['loss_err']:.1e} | "
              f"{r['weight_grad_err']:.2e} | {r['hidden_grad_err']:.2e} |")


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
