"""bench/loss.py's methods and its worker: the seeded batch, each method's loss (ours, torch's
chunked `linear_cross_entropy`, TRL's `ChunkedLogProbFunction`, the unfused reference), and one
method timed and measured in a process of its own (`--worker`).
"""

from __future__ import annotations

import json
import statistics
import time

from bench.measure import peak_rss_bytes, rss_bytes
from constants import IGNORE_INDEX
from fixtures.tensor_peak import TensorPeak

# SFTTrainer patches the model with add_fused_lm_head(..., outputs=SFT_OUTPUTS) (trl/trainer/sft_trainer.py):
# the loss's log-probabilities, plus entropy and top-1 for its logged metrics.
SFT_OUTPUTS = ("log_probs", "entropy", "is_top1")
METHODS = ("ours", "torch_default", "torch_chunk", "trl_sft", "trl_nll", "unfused")


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

        from bench.patches import trl_uses_triton

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
        from bench.patches import torch_default_chunk_rows

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
    """One method in this process (`--worker`): its figures on stdout as a `RESULT` line."""
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

    base = rss_bytes()
    timing, loss = timed_steps(step, args)
    peak = peak_rss_bytes()  # this process's own high water, not its parent's (see peak_rss_bytes)
    tensor_peak = None
    if not args.no_tensor_peak:
        hidden.grad = head.weight.grad = None
        tensor_peak = TensorPeak(torch.device("cpu")).of(step)

    result = {
        "vocab": args.vocab,
        "method": args.worker,
        "chunk": resolved_chunk(args.worker, args, args.rows, args.hidden, args.vocab),
        **timing,
        "base_rss_mib": base / 2**20,
        "peak_rss_mib": peak / 2**20,
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


def trl_vocab_chunk(vocab: int) -> int:
    """TRL's tile width (trl/trainer/utils.py), cut to the vocabulary as bench/training.py cuts it
    for its TRL peer: wider, the tile's extra columns are allocated and never written."""
    from bench.patches import trl_chunk_size

    return min(trl_chunk_size(), vocab)
