"""DeepSpeed ZeRO-2/3 for real, on CPU over gloo (`pip install -r requirements-deepspeed.txt`;
CI installs it): ZeRO-2 trains the same weights as one process, ZeRO-3 saves a delta of whole
tensors (never the peers' empty `torch.Size([0])` shards) that infer.py loads, `--init_from`
writes a parent's delta into partitioned parameters, and every shipped config passes the
Trainer's DeepSpeed integration."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

from cli import parse_config
from run.checkpoint import DELTA, load_checkpoint, read_manifest
from tests.helpers import LORA_AND_CONNECTOR, REPO_ROOT, SUBPROCESS_ENV, torchrun_train

deepspeed = pytest.importorskip("deepspeed", reason="pip install -r requirements-deepspeed.txt (CI does)")

CONFIGS = sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "deepspeed", "*.json")))


@pytest.fixture(scope="module")
def zero3_everything_partitioned(tmp_path_factory) -> str:
    """zero3.json, except that no parameter is small enough to stay whole: the tiny model's
    tensors are all below DeepSpeed's persistence threshold and would otherwise not be sharded."""
    with open(os.path.join(REPO_ROOT, "configs", "deepspeed", "zero3.json")) as f:
        config = json.load(f)
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path_factory.mktemp("ds") / "zero3_all.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.deepspeed
def test_zero2_trains_the_weights_of_one_process(tiny_base, demo_data, tmp_path):
    torchrun_train(1, tiny_base, demo_data, tmp_path / "one", "--freeze_vit", "true")
    torchrun_train(2, tiny_base, demo_data, tmp_path / "zero2", "--freeze_vit", "true",
                   "--deepspeed", "configs/deepspeed/zero2.json")
    one, zero2 = load_file(tmp_path / "one" / DELTA), load_file(tmp_path / "zero2" / DELTA)
    assert set(one) == set(zero2) and any(k.startswith("llm.") for k in one)
    for name in one:
        # Measured: 7e-6 apart (DeepSpeed reduces gradients in another order than one process).
        torch.testing.assert_close(zero2[name], one[name], atol=1e-4, rtol=0, msg=name)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.deepspeed
def test_zero3_fused_loss_trains_like_the_llms_own_head(tiny_base, demo_data, tmp_path, zero3_everything_partitioned):
    """The fused loss reads the LM head's weight outside the head's own forward; under ZeRO-3,
    every tensor sharded, DeepSpeed gathers it as an external parameter, and its gradient reaches
    the shard. The whole LLM trains as with the LLM's own head and loss (`--fused_loss false`)."""
    runs = {}
    for fused in ("true", "false"):
        out = tmp_path / f"fused_{fused}"
        torchrun_train(2, tiny_base, demo_data, out, "--freeze_vit", "true", "--fused_loss", fused,
                       "--deepspeed", zero3_everything_partitioned)
        runs[fused] = load_file(out / DELTA)
    assert set(runs["true"]) == set(runs["false"]) and "llm.lm_head.weight" in runs["true"]
    for name, expected in runs["false"].items():
        # Measured: 5e-6 apart.
        torch.testing.assert_close(runs["true"][name], expected, atol=1e-4, rtol=0, msg=name)
    base_head = load_file(glob.glob(os.path.join(tiny_base["llm"], "*.safetensors"))[0])["lm_head.weight"]
    assert (runs["true"]["llm.lm_head.weight"] - base_head).abs().max() > 1e-3  # it trained


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.deepspeed
def test_zero3_lora_and_connector_delta_is_whole_and_loads(
    tiny_base, demo_data, tmp_path, zero3_everything_partitioned
):
    out = tmp_path / "zero3"
    stdout = torchrun_train(2, tiny_base, demo_data, out, *LORA_AND_CONNECTOR, "--deepspeed", zero3_everything_partitioned)
    # The freeze table counts shards by their full size (DeepSpeed's ds_numel), not as empty.
    assert "vision     frozen              78,208" in stdout, stdout

    manifest = read_manifest(str(out))
    delta = load_file(out / DELTA)
    adapter = load_file(out / "llm_adapter" / "adapter_model.safetensors")
    assert sorted(delta) == sorted(manifest["tensors"]) and all(k.startswith("connector.") for k in delta)
    for name, tensor in {**delta, **adapter}.items():
        assert tensor.numel() > 0 and torch.isfinite(tensor).all(), name
    # LoRA B starts at zero: non-zero values prove the trained shards were gathered, not zeros.
    assert all(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)

    model, *_ = load_checkpoint(str(out))  # the fingerprint (taken from gathered shards) matches
    params = dict(model.named_parameters())
    for name, tensor in delta.items():
        assert torch.equal(params[name], tensor), name
    result = subprocess.run(
        [sys.executable, "infer.py", "--checkpoint", str(out), "--data", demo_data["eval"],
         "--image_folder", demo_data["image_folder"]],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=SUBPROCESS_ENV,
    )
    assert result.returncode == 0 and "accuracy:" in result.stdout, result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.deepspeed
def test_init_from_writes_the_parent_delta_into_zero3_shards(
    tiny_base, demo_data, tmp_path, zero3_everything_partitioned
):
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    # Stage 1 trains the connector alone; stage 2 freezes it and adds LoRA, all under ZeRO-3.
    torchrun_train(2, tiny_base, demo_data, stage1, "--freeze_vit", "true", "--freeze_llm", "true",
          "--deepspeed", zero3_everything_partitioned)
    torchrun_train(2, tiny_base, demo_data, stage2, *LORA_AND_CONNECTOR, "--freeze_qformer", "true",
          "--init_from", str(stage1), "--deepspeed", zero3_everything_partitioned)
    parent, child = load_file(stage1 / DELTA), load_file(stage2 / DELTA)
    assert set(parent) <= set(child)
    for name in parent:  # frozen in stage 2: what was written into the shards comes back unchanged
        assert torch.equal(child[name], parent[name]), name
    load_checkpoint(str(stage2))


@pytest.mark.deepspeed
@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_deepspeed_configs_pass_the_trainer_integration(path):
    from deepspeed.runtime.config import DeepSpeedConfig  # local: deepspeed is optional (importorskip above)

    try:
        *_, args = parse_config(["configs/demo.yaml", "--deepspeed", path, "--output_dir", "/tmp/unused"])
        config = HfTrainerDeepSpeedConfig(path)
        config.trainer_config_process(args)
        # No model: the VLM has no `config.hidden_size`, so the hidden-size "auto" keys must be
        # numbers in our configs; finalize raises if one is left.
        config.trainer_config_finalize(args, model=None, num_training_steps=10)
    finally:
        unset_hf_deepspeed_config()  # or later tests in this process would build under zero.Init
    assert "auto" not in json.dumps(config.config), "an `auto` the Trainer cannot fill"
    resolved = DeepSpeedConfig(config.config)  # DeepSpeed's own schema and batch-size checks
    assert resolved.zero_optimization_stage in (2, 3)
    if resolved.zero_optimization_stage == 3:
        assert resolved.zero_config.gather_16bit_weights_on_model_save  # or the delta cannot be saved


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.deepspeed
def test_zero3_relaunching_a_finished_run_changes_nothing(tiny_base, demo_data, tmp_path, zero3_everything_partitioned):
    """A retrying scheduler's relaunch of a finished ZeRO-3 run: no step past max_steps (the
    Trainer alone would train one), the delta untouched, every rank leaves."""
    out = tmp_path / "zero3"
    args = (*LORA_AND_CONNECTOR, "--deepspeed", zero3_everything_partitioned, "--save_strategy", "steps", "--save_steps", "3",
            "--lr_scheduler_type", "constant")
    torchrun_train(2, tiny_base, demo_data, out, *args)
    delta = load_file(out / DELTA)
    stdout = torchrun_train(2, tiny_base, demo_data, out, *args, "--resume_from_checkpoint", "true")
    assert "finished at step 3" in stdout, stdout
    assert not (out / "checkpoint-4").exists() and (out / "checkpoint-3").exists()
    for name, tensor in load_file(out / DELTA).items():
        assert torch.equal(tensor, delta[name]), name
