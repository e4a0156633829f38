"""torchrun DDP on CPU (gloo), with the same code as on GPUs: two ranks train the same weights as
one process with the same global batch, only rank 0 writes, and a rank whose batches hold no
image (text-only samples are legal) does not hang the other."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from run.checkpoint import DELTA

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def run(launcher: list[str], tiny_base, data_path, image_folder, out, *extra) -> str:
    argv = [
        *launcher, "train.py", "configs/demo.yaml",
        "--vision_model", tiny_base["vision"], "--llm_model", tiny_base["llm"],
        "--data_path", data_path, "--image_folder", image_folder, "--eval_data_path", "",
        "--output_dir", out, "--max_steps", "3", "--disable_tqdm", "true", "--warmup_steps", "0",
        *extra,
    ]
    result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


def write_records(path, records) -> str:
    with open(path, "w") as f:
        json.dump(records, f)
    return str(path)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_match_one_process_and_only_rank0_writes(tiny_base, demo_data, tmp_path):
    with open(demo_data["train"]) as f:
        records = json.load(f)[:8]
    # Every step sees the whole 8-record set, so the data order cannot differ between runs.
    data = write_records(tmp_path / "eight.json", records)
    single = str(tmp_path / "single")
    run([sys.executable], tiny_base, data, demo_data["image_folder"], single, "--per_device_train_batch_size", "8")
    ddp = str(tmp_path / "ddp")
    log = run([TORCHRUN, "--standalone", "--nproc_per_node=2"], tiny_base, data, demo_data["image_folder"], ddp,
              "--per_device_train_batch_size", "4")

    saves = [line for line in log.splitlines() if "saved delta checkpoint" in line]
    assert saves == [f"[rank 0] saved delta checkpoint to {ddp}"], saves
    expected, actual = load_file(os.path.join(single, DELTA)), load_file(os.path.join(ddp, DELTA))
    assert expected.keys() == actual.keys()
    base = load_file(os.path.join(tiny_base["llm"], "model.safetensors"))
    moved = 0
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=1e-5, msg=name)
        plain = name.removeprefix("llm.")
        moved += plain in base and not torch.equal(base[plain], tensor)
    assert moved > 0, "training changed nothing, so the comparison proves nothing"


@pytest.mark.slow
@pytest.mark.distributed
def test_text_only_batches_on_one_rank_do_not_hang(tiny_base, demo_data, tmp_path):
    with open(demo_data["train"]) as f:
        with_image = json.load(f)[0]
    text_only = {
        "id": "text-only",
        "conversations": [{"from": "human", "value": "What is a square?"}, {"from": "gpt", "value": "square"}],
    }
    data = write_records(tmp_path / "mixed.json", [with_image, text_only])
    out = str(tmp_path / "mixed")
    # Batch 1 per rank over two records: at every step one rank has the image, the other none.
    run([TORCHRUN, "--standalone", "--nproc_per_node=2"], tiny_base, data, demo_data["image_folder"], out,
        "--per_device_train_batch_size", "1")
    assert os.path.isfile(os.path.join(out, DELTA))
