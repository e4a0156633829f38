"""Every launch script in scripts/ runs for real on the tiny base: its model ids, data and output
are overridden through the variables at its top, and two training steps through its arguments.
The scripts are thin (settings live in configs/), so this checks that they and their configs
stay in step with train.py."""

from __future__ import annotations

import glob
import os
import subprocess

import pytest
import yaml

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(REPO_ROOT, "scripts", "*.sh")))
# fp32 and no wandb on a CPU; everything else as the recipe says.
CPU_ARGS = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--dtype", "float32",
            "--bf16", "false", "--report_to", "none", "--save_strategy", "no", "--dataloader_num_workers", "0"]


def test_every_script_is_covered():
    assert {os.path.basename(s) for s in SCRIPTS} >= {
        "llava15.sh", "llava15_lora.sh", "qlora.sh", "minicpmv.sh", "askanything.sh", "openpi.sh"
    }


@pytest.fixture(scope="module")
def stage1(tiny_base, demo_data, tmp_path_factory):
    """A connector-only stage to start the LoRA recipe from, as LLaVA's pretrain would give."""
    out = str(tmp_path_factory.mktemp("llava15"))
    run_script("llava15.sh", tiny_base, demo_data, out)
    return out


def run_script(name, tiny_base, demo_data, out, **env):
    variables = {
        "NPROC": "1", "VISION": tiny_base["vision"], "LLM": tiny_base["llm"], "OUT": out,
        "DATA": demo_data["train"], "IMAGES": demo_data["image_folder"],
        "PRETRAIN_DATA": demo_data["train"], "PRETRAIN_IMAGES": demo_data["image_folder"],
        "FINETUNE_DATA": demo_data["train"], "FINETUNE_IMAGES": demo_data["image_folder"], **env,
    }
    result = subprocess.run(
        ["bash", os.path.join(REPO_ROOT, "scripts", name), *CPU_ARGS],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, **variables, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, f"{name}: exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def manifest_exists(folder):
    return os.path.isfile(os.path.join(folder, "vlm_manifest.json"))


def test_llava15_two_stages(stage1):
    assert manifest_exists(os.path.join(stage1, "pretrain")) and manifest_exists(os.path.join(stage1, "finetune"))


@pytest.mark.parametrize("name", ["llava15_lora.sh", "qlora.sh", "minicpmv.sh", "openpi.sh"])
def test_single_stage_script(name, stage1, tiny_base, demo_data, tmp_path):
    out = str(tmp_path / "out")
    # llava15_lora.yaml starts from the stage-1 projector; the others start from the base.
    init_from = {"INIT_FROM": os.path.join(stage1, "pretrain")} if name == "llava15_lora.sh" else {}
    run_script(name, tiny_base, demo_data, out, **init_from)
    assert manifest_exists(out)


def test_askanything_two_stages(tiny_base, demo_data, tmp_path):
    run_script("askanything.sh", tiny_base, demo_data, str(tmp_path))
    assert manifest_exists(str(tmp_path / "stage1")) and manifest_exists(str(tmp_path / "stage2"))


def test_scripts_set_only_what_the_user_passes():
    """Model ids, data paths and every setting live in configs/: a script names none of them, so a
    config edit is never silently undone by a script's default."""
    ids = set()
    for path in glob.glob(os.path.join(REPO_ROOT, "configs", "*.yaml")):
        with open(path) as f:
            config = yaml.safe_load(f)
        ids |= {config[k] for k in ("vision_model", "llm_model", "vlm_model", "data_path") if config.get(k)}
    for script in SCRIPTS:
        with open(script) as f:
            code = [line for line in f if not line.lstrip().startswith("#")]
        named = [i for i in ids for line in code if i in line]
        assert named == [], f"{os.path.basename(script)} sets {named}: leave them to its config"
