"""Nothing is lost: a run killed (SIGKILL) after a checkpoint, with a later save cut off
half-written, resumes from the last complete checkpoint and ends with the same trained weights
as a run that was never interrupted."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from run.checkpoint import DELTA
from run.run_folder import COMPLETE, latest_checkpoint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}


def train_argv(tiny_base, demo_data, out, *extra):
    return [
        sys.executable, "train.py", "configs/demo.yaml",
        "--vision_model", tiny_base["vision"], "--llm_model", tiny_base["llm"],
        "--data_path", demo_data["train"], "--image_folder", demo_data["image_folder"],
        "--eval_data_path", "",  # no accuracy pass: only the weights matter here
        "--output_dir", out, "--max_steps", "8", "--per_device_train_batch_size", "4",
        "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "1",
        "--logging_steps", "1", "--disable_tqdm", "true", *extra,
    ]


def run(argv):
    result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted_run(tiny_base, demo_data, tmp_path):
    reference = str(tmp_path / "reference")
    run(train_argv(tiny_base, demo_data, reference))

    interrupted = str(tmp_path / "interrupted")
    process = subprocess.Popen(
        train_argv(tiny_base, demo_data, interrupted), cwd=REPO_ROOT, env=ENV,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 600
    while latest_checkpoint(interrupted) is None and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    good = latest_checkpoint(interrupted)
    assert good is not None, "the run died before its first checkpoint"
    assert not os.path.isfile(os.path.join(interrupted, DELTA)), "the kill came after the end of training"

    # A later save cut off half-way: files copied, the delta truncated, no completion mark.
    step = int(good.rsplit("-", 1)[1])
    torn = os.path.join(interrupted, f"checkpoint-{step + 2}")
    shutil.rmtree(torn, ignore_errors=True)
    shutil.copytree(good, torn)
    os.remove(os.path.join(torn, COMPLETE))
    with open(os.path.join(torn, DELTA), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(torn, DELTA)) // 2)
    assert latest_checkpoint(interrupted) == good

    result = run(train_argv(tiny_base, demo_data, interrupted, "--resume_from_checkpoint", "true"))
    # It continued from the checkpoint rather than starting over (which would also end on the
    # same weights): only the remaining steps logged a loss.
    logged_steps = (result.stdout + result.stderr).count("'loss':")
    assert logged_steps == 8 - step, (logged_steps, step)

    expected = load_file(os.path.join(reference, DELTA))
    resumed = load_file(os.path.join(interrupted, DELTA))
    assert expected.keys() == resumed.keys() and len(expected) > 0
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=name)
    # save_total_limit 1: one complete checkpoint left, the torn one cleaned up.
    checkpoints = sorted(n for n in os.listdir(interrupted) if n.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-8"]


@pytest.mark.slow
def test_relaunching_a_finished_run_changes_nothing(tiny_base, demo_data, tmp_path):
    """What a retrying job scheduler does: the same command with --resume_from_checkpoint true
    after the run ended. No step past max_steps, no file rewritten."""
    out = str(tmp_path / "run")
    argv = train_argv(tiny_base, demo_data, out, "--max_steps", "4", "--lr_scheduler_type", "constant")
    run(argv)
    before = {name: os.path.getmtime(os.path.join(out, name)) for name in os.listdir(out)}
    delta = load_file(os.path.join(out, DELTA))
    result = run([*argv, "--resume_from_checkpoint", "true"])
    assert "finished at step 4" in result.stdout
    assert not os.path.exists(os.path.join(out, "checkpoint-5")) and latest_checkpoint(out).endswith("checkpoint-4")
    assert {name: os.path.getmtime(os.path.join(out, name)) for name in os.listdir(out)} == before
    for name, tensor in load_file(os.path.join(out, DELTA)).items():
        assert torch.equal(tensor, delta[name]), name


@pytest.mark.slow
def test_a_finished_run_cut_off_before_its_final_save_saves_its_last_checkpoint(tiny_base, demo_data, tmp_path):
    out = str(tmp_path / "run")
    argv = train_argv(tiny_base, demo_data, out, "--max_steps", "4", "--lr_scheduler_type", "constant")
    run(argv)
    final = load_file(os.path.join(out, DELTA))
    os.remove(os.path.join(out, "vlm_manifest.json"))  # as if killed before the final save
    run([*argv, "--resume_from_checkpoint", "true"])
    assert not os.path.exists(os.path.join(out, "checkpoint-5"))
    for name, tensor in load_file(os.path.join(out, DELTA)).items():
        assert torch.equal(tensor, final[name]), name
