"""FSDP2 (`fully_shard`) through the Trainer, on CPU over gloo: `--fsdp "full_shard auto_wrap"`
really shards (accelerate would otherwise wrap the model in plain DDP on a CPU), each decoder and
encoder layer gets its own shard group, LoRA trains the weights one process trains, and the
delta, saved from full tensors, loads back. FSDP1 needs a GPU (see the README)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import torch
from safetensors.torch import load_file

from model.build import build_model
from model.checkpoint import DELTA, load_checkpoint
from tests.helpers import tiny_model_args

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
LORA_AND_CONNECTOR = ["--freeze_vit", "true", "--freeze_llm", "true", "--lora_enable", "true"]
# Measured: connector within 1.3e-5, LoRA within 2e-4 (of values up to ~1) after 3 SGD steps at
# lr 0.1: FSDP reduce-scatters gradients in another order. An untrained or unsaved tensor is
# off by the size of an update (~1e-2).
SAME_TRAINING = {"atol": 5e-4, "rtol": 1e-3}


def train(nproc: int, tiny_base, demo_data, out, *extra) -> str:
    argv = [
        TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "train.py", "configs/demo.yaml",
        "--vision_model", tiny_base["vision"], "--llm_model", tiny_base["llm"],
        "--build_tiny_base_if_missing", "false", "--make_demo_data_if_missing", "false",
        "--data_path", demo_data["train"], "--image_folder", demo_data["image_folder"],
        "--eval_data_path", demo_data["eval"], "--output_dir", str(out), "--max_steps", "3",
        "--warmup_steps", "0", "--disable_tqdm", "true", "--per_device_train_batch_size", str(4 // nproc),
        *LORA_AND_CONNECTOR, *extra,
    ]
    result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def test_wrap_policy_names_the_decoder_and_encoder_layers(tiny_base):
    model = build_model(tiny_model_args(tiny_base))
    assert {"LlamaDecoderLayer", "CLIPEncoderLayer"} <= set(model._no_split_modules)
    present = {type(m).__name__ for m in model.modules()}
    assert set(model._no_split_modules) <= present  # accelerate refuses a name it cannot find


def test_fsdp2_on_cpu_shards_trains_like_one_process_and_saves_a_whole_delta(tiny_base, demo_data, tmp_path):
    one = tmp_path / "one"
    fsdp = tmp_path / "fsdp"
    # SGD: Adam turns the float noise of near-zero gradients (LoRA A at B = 0) into +-lr steps,
    # so only a linear optimizer lets two engines be compared tightly.
    sgd = ["--optim", "sgd", "--learning_rate", "0.1"]
    stdout_one = train(1, tiny_base, demo_data, one, *sgd)
    stdout = train(2, tiny_base, demo_data, fsdp, *sgd, "--fsdp", "full_shard auto_wrap")

    assert "engine: DDP, 1 process" in stdout_one  # torchrun with one rank: DDP of one
    engine = re.search(r"engine: FSDP2 \(fully_shard: (\d+) sharded modules\), 2 processes", stdout)
    assert engine, f"not sharded by FSDP2:\n{stdout[-2000:]}"
    # Root + 2 decoder layers + the tower's encoder layers: each layer is its own group.
    assert int(engine.group(1)) > 3
    assert "Held-out evaluation skipped" in stdout  # shards cannot answer on rank 0 alone

    expected, delta = load_file(one / DELTA), load_file(fsdp / DELTA)
    assert set(delta) == set(expected) and all(t.numel() > 0 for t in delta.values())
    for name in expected:
        torch.testing.assert_close(delta[name], expected[name], **SAME_TRAINING, msg=name)
    adapter = "llm_adapter/adapter_model.safetensors"
    expected_lora, lora = load_file(one / adapter), load_file(fsdp / adapter)
    assert set(lora) == set(expected_lora)
    assert all(t.abs().sum() > 0 for k, t in lora.items() if "lora_B" in k)  # B starts at 0: it trained
    for name in expected_lora:
        torch.testing.assert_close(lora[name], expected_lora[name], **SAME_TRAINING, msg=name)

    model, *_ = load_checkpoint(str(fsdp))
    params = dict(model.named_parameters())
    for name, tensor in delta.items():
        assert torch.equal(params[name], tensor), name
