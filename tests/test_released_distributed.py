"""A released VLM (`--vlm_model`, the tiny llava of fixtures/tiny_vlms.py) under `torchrun` with 2
ranks on CPU (gloo): DDP where one rank's batch holds no image (it must run the image path, or
the other rank waits for its gradients forever), DDP with LoRA on the vision tower, a ZeRO-3
run whose delta, gathered from shards, loads on one process and answers, ZeRO-2 and FSDP2."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
import torch
from helpers import REPO_ROOT, SUBPROCESS_ENV, TORCHRUN
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from data.media import load_image
from run.checkpoint import DELTA, load_checkpoint, read_manifest
from run.fingerprint import base_name
from run.predict import generate_answers

FAMILY = "llava"
LORA = ["--lora_enable", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0"]
HANG_GUARD_S = 300  # two steps of a tiny model take seconds; a rank waiting on the other never ends


def torchrun_train(folder: str, data_path: str, image_folder: str, out, *extra: str) -> str:
    """2 steps of train.py on 2 ranks, batch 1 per rank; returns stdout + stderr."""
    argv = [
        TORCHRUN, "--standalone", "--nproc_per_node=2", "train.py", "--vlm_model", folder,
        "--data_path", data_path, "--image_folder", image_folder, "--output_dir", str(out),
        "--max_steps", "2", "--per_device_train_batch_size", "1", "--report_to", "none",
        "--disable_tqdm", "true", "--warmup_steps", "0", "--learning_rate", "1e-3",
        "--data_check_cache", os.path.join(str(out), "..", "cache"), *extra,
    ]
    result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S,
                            env=SUBPROCESS_ENV)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


def base_parameters(folder: str) -> dict[str, torch.Tensor]:
    return dict(AutoModelForImageTextToText.from_pretrained(folder).named_parameters())


def plain(name: str) -> str:
    """A delta name (`vlm.base_model.model.model.multi_modal_projector...`) as transformers names it."""
    return base_name(name.removeprefix("vlm."))


def engine(out) -> str:
    with open(os.path.join(str(out), "engine.txt")) as f:
        return f.read()


def answers(out, image_folder: str) -> tuple[list[str], torch.Tensor]:
    """The loaded checkpoint's answer to one question, and its first tokens (no stop at end of turn)."""
    model, inputs, _ = load_checkpoint(str(out))
    image = load_image(os.path.join(image_folder, "images", "train-00000.png"))
    prompts = [([{"role": "user", "content": "<image>\nWhat color are the shapes?"}], [image])]
    tokens = model.generate(**inputs.prompt_batch(prompts), max_new_tokens=4, min_new_tokens=4,
                            do_sample=False, pad_token_id=inputs.text_tokenizer.pad_token_id)
    return generate_answers(model, inputs, prompts, max_new_tokens=8), tokens


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_with_a_text_only_batch_on_one_rank_finishes(released_vlm, released_data, tmp_path):
    folder = released_vlm(FAMILY)
    with open(released_data["mixed"]) as f:
        records = json.load(f)
    assert len(records) == 2 and ("image" in records[0]) != ("image" in records[1])
    out = tmp_path / "ddp"
    # Two records, batch 1 on each of 2 ranks: at every step one rank has the image, the other none.
    log = torchrun_train(folder, released_data["mixed"], released_data["image_folder"], out, *LORA)

    assert "DDP, 2 processes" in engine(out)
    saves = [line for line in log.splitlines() if "saved delta checkpoint to" in line and line.endswith(str(out))]
    assert saves == [f"[rank 0] saved delta checkpoint to {out}"], saves
    with open(out / "trainer_state.json") as f:
        assert json.load(f)["global_step"] == 2
    delta = load_file(out / DELTA)
    base = base_parameters(folder)
    assert delta and all(plain(n).startswith("model.multi_modal_projector.") for n in delta)
    assert any(not torch.equal(t, base[plain(n)]) for n, t in delta.items()), "the connector never trained"
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)
    (answer,), tokens = answers(out, released_data["image_folder"])
    assert isinstance(answer, str) and tokens.shape == (1, 4)


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_with_vision_lora_on_llava_trains(released_vlm, released_data, tmp_path):
    """LoRA on the tower (`--lora_target vit`) under 2-rank DDP, which train.py runs without
    find_unused_parameters: every LoRA weight must get a gradient on every step."""
    out = tmp_path / "vit"
    torchrun_train(released_vlm(FAMILY), released_data["train"], released_data["image_folder"], out,
                   *LORA, "--lora_target", "vit")
    assert "DDP, 2 processes" in engine(out)
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert adapter and all("vision_tower" in k for k in adapter)


@pytest.mark.deepspeed
@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_save_is_whole_and_loads_on_one_process(released_vlm, released_data, tmp_path):
    folder = released_vlm(FAMILY)
    # zero3.json, except that no tensor is small enough to stay whole: the tiny model's are all
    # below DeepSpeed's persistence threshold and would otherwise not be partitioned at all.
    with open(os.path.join(REPO_ROOT, "configs", "deepspeed", "zero3.json")) as f:
        config = json.load(f)
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds_config = tmp_path / "zero3_all.json"
    ds_config.write_text(json.dumps(config))
    out = tmp_path / "zero3"
    torchrun_train(folder, released_data["train"], released_data["image_folder"], out, *LORA,
                   "--deepspeed", str(ds_config))

    assert "ZeRO-3, 2 processes" in engine(out)
    manifest = read_manifest(str(out))
    delta = load_file(out / DELTA)
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    base = base_parameters(folder)
    assert sorted(delta) == sorted(manifest["tensors"]) and delta
    for name, tensor in delta.items():  # whole tensors, never the peers' empty torch.Size([0]) shards
        assert tensor.shape == base[plain(name)].shape and torch.isfinite(tensor).all(), name
    assert any(not torch.equal(t, base[plain(n)]) for n, t in delta.items()), "the connector never trained"
    assert adapter and all(t.numel() > 0 and torch.isfinite(t).all() for t in adapter.values())
    # LoRA B starts at zero: values prove the trained shards were gathered, not zeros.
    assert all(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)

    # The fingerprint taken from gathered shards matches the base loaded whole on one process.
    model, *_ = load_checkpoint(str(out))
    params = dict(model.named_parameters())
    assert all(torch.equal(params[name], tensor) for name, tensor in delta.items())
    (answer,), tokens = answers(out, released_data["image_folder"])
    assert isinstance(answer, str) and tokens.shape == (1, 4)


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_shards_each_layer_and_saves_a_whole_delta(released_vlm, released_data, tmp_path):
    """FSDP2 (`fully_shard`) wraps the layer classes the released model declares
    (`_no_split_modules`): each is its own shard group; the delta and adapter are gathered whole
    and load on one process."""
    folder = released_vlm(FAMILY)
    out = tmp_path / "fsdp2"
    stdout = torchrun_train(folder, released_data["train"], released_data["image_folder"], out, *LORA,
                            "--fsdp", "full_shard auto_wrap")

    sharded = re.search(r"FSDP2 \(fully_shard: (\d+) sharded modules\), 2 processes", engine(out))
    assert sharded, stdout[-2000:]
    assert int(sharded.group(1)) > 3  # the root, and each decoder and encoder layer
    delta = load_file(out / DELTA)
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    base = base_parameters(folder)
    for name, tensor in delta.items():  # whole tensors, as the base holds them
        assert tensor.shape == base[plain(name)].shape and torch.isfinite(tensor).all(), name
    assert any(not torch.equal(t, base[plain(n)]) for n, t in delta.items()), "the connector never trained"
    assert adapter and all(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)

    model, *_ = load_checkpoint(str(out))
    params = dict(model.named_parameters())
    assert all(torch.equal(params[name], tensor) for name, tensor in delta.items())


@pytest.mark.deepspeed
@pytest.mark.slow
@pytest.mark.distributed
def test_zero2_trains_and_its_delta_loads(released_vlm, released_data, tmp_path):
    folder = released_vlm(FAMILY)
    out = tmp_path / "zero2"
    torchrun_train(folder, released_data["train"], released_data["image_folder"], out, *LORA,
                   "--deepspeed", os.path.join(REPO_ROOT, "configs", "deepspeed", "zero2.json"))

    assert "ZeRO-2, 2 processes" in engine(out)
    delta = load_file(out / DELTA)
    base = base_parameters(folder)
    assert delta and any(not torch.equal(t, base[plain(n)]) for n, t in delta.items()), "the connector never trained"
    model, *_ = load_checkpoint(str(out))
    params = dict(model.named_parameters())
    assert all(torch.equal(params[name], tensor) for name, tensor in delta.items())
