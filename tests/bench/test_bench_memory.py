"""bench/memory.py: the `--dry_run` plan against the measured peak RSS of real training steps, its
children run as the benchmark runs them."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from bench.memory import CHILD_ENV, child_command

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_plan_matches_measured_peak_rss(tiny_base):
    """Real VLMTrainer steps for three recipes, each in its own subprocess
    (bench/memory.py's child; run side by side): peak RSS minus the RSS after imports,
    build and a one-sample warm-up, against gradients + AdamW states + activations of the plan.
    Batch 8 x 320 tokens: 50-60 MiB planned, well above the ~1 MiB of noise in RSS."""
    runs = ["connector_only", "lora_llm:ckpt", "qlora_nf4:ckpt"]
    env = {**os.environ, **CHILD_ENV, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    base_dir = os.path.dirname(tiny_base["llm"])
    children = [
        subprocess.Popen(
            child_command(base_dir, run, batch_size=8, seq_len=320, steps=2),
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for run in runs
    ]
    for run, process in zip(runs, children, strict=True):
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
        figures = json.loads(stdout.strip().splitlines()[-1])
        assert (figures["recipe"], figures["checkpointing"]) == (run.split(":")[0], run.endswith(":ckpt"))
        assert figures["planned"] > 30 * 2**20
        assert figures["planned"] == pytest.approx(figures["measured"], rel=0.15), figures
