"""bench/loss.py at a tiny size: every method's row is printed with finite figures, and
every method's loss and gradients match ours. Speed is measured by hand (docs/benchmarks.md),
never asserted here."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from bench import loss as bench_loss
from bench.loss_bf16 import bf16_accuracy
from bench.loss_gpu_plan import plan_rows
from bench.loss_methods import METHODS

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = ["--rows", "64", "--hidden", "16", "--vocabs", "128", "--repeats", "2", "--torch_chunks", "32", "--threads", "1"]


def table(stdout: str) -> list[dict[str, str]]:
    """The rows under the header, as {column: value}."""
    header = "| " + " | ".join(bench_loss.COLUMNS) + " |"
    lines = stdout.splitlines()
    assert header in lines, stdout
    rows = []
    for line in lines[lines.index(header) + 2 :]:
        if not line.startswith("| "):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows.append(dict(zip(bench_loss.COLUMNS, cells, strict=True)))
    return rows


@pytest.mark.slow
def test_every_method_prints_a_finite_row_matching_ours():
    result = subprocess.run(
        [sys.executable, "-m", "bench.loss", *ARGS],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = table(result.stdout)
    assert {row["method"] for row in rows} == set(METHODS), rows
    chunks = {row["chunk"] for row in rows if row["method"] == "torch_chunk"}
    assert chunks == {"32"}, chunks
    for row in rows:
        assert row["vocab"] == "128"
        for column in ("chunk", "time_s", "min_s", "cpu_s", "base_rss_mib", "peak_rss_mib", "delta_rss_mib", "tensor_peak_mib",
                       "loss", "loss_diff", "grad_diff"):
            assert math.isfinite(float(row[column])), (column, row)
        # Times are printed to 1 ms (a step this small can read 0), but the median of the timed
        # steps is never below the fastest of them, and rounding keeps that order.
        assert 0 <= float(row["min_s"]) <= float(row["time_s"]), row
        assert float(row["cpu_s"]) >= 0 and float(row["base_rss_mib"]) > 0, row
        assert float(row["peak_rss_mib"]) >= float(row["base_rss_mib"]) - 1, row  # VmHWM, not the parent's peak
        assert abs(float(row["loss"]) - math.log(128)) < 1.0, row  # a near-uniform head over 128 words
        assert float(row["loss_diff"]) <= 1e-4 * float(row["loss"]), row
        assert float(row["grad_diff"]) <= 1e-4, row
        assert row["match"] == "yes", row
    assert "vocab 128: ours" in result.stdout


def test_gpu_plan_follows_the_code_constants():
    """--plan's logits per method at the GPU shape come from each implementation's own chunking."""
    import model.loss

    n, d, v = 5272, 896, 151936
    plan = {row["method"]: row for row in plan_rows(n, d, v)}
    ours_rows = model.loss.CHUNK_ELEMENTS // v
    assert plan["ours"]["chunk"] == f"{ours_rows} rows"
    assert plan["ours"]["logits_mib"] * 2**20 == ours_rows * v * 6  # bf16 logits + their fp32 upcast
    assert plan["torch_chunk (= ours' rows)"]["logits_mib"] == plan["ours"]["logits_mib"]
    # torch's default chunk: its aspect-ratio heuristic, next_pow2(ceil(N / ceil(V / D))).
    assert plan["torch_default"]["chunk"] == f"{1 << (math.ceil(n / math.ceil(v / d)) - 1).bit_length()} rows"
    assert plan["unfused"]["logits_mib"] * 2**20 == n * v * 10
    assert plan["trl"]["head_matmuls"] == 4 and plan["ours"]["head_matmuls"] == 3


def test_bf16_accuracy_rows():
    """--bf16 at a tiny size: a row per precision and method, ours' loss in fp32 and its gradients
    as close to float64 as bf16 allows."""
    args = bench_loss.parse_args(["--bf16", "--bf16_rows", "64", "--bf16_hidden", "8", "--bf16_vocab", "256",
                                  "--bf16_chunk", "16", "--threads", "1"])
    import model.loss

    chunk_elements = model.loss.CHUNK_ELEMENTS
    try:
        rows = bf16_accuracy(args)
    finally:
        model.loss.CHUNK_ELEMENTS = chunk_elements  # bf16_accuracy sets ours' chunk to --bf16_chunk rows
    assert len(rows) == 2 * 5
    for row in rows:
        assert all(math.isfinite(row[key]) for key in ("loss_err", "weight_grad_err", "hidden_grad_err")), row
        assert row["weight_grad_err"] < 0.05 and row["hidden_grad_err"] < 0.05, row
    ours = [row for row in rows if row["method"] == "ours"]
    assert all(row["loss_dtype"] == "float32" and row["loss_err"] < 1e-3 for row in ours), ours
