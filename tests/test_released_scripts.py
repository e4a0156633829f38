"""Every released-VLM launch script runs for real, two steps on a tiny model of its family: the
config's hub id replaced through MODEL (as a user points at a local copy), the data through DATA
and IMAGES. The real ids stay in configs/; this checks the scripts and configs stay in step with
train.py, and that each recipe trains what it says."""

from __future__ import annotations

import os
import subprocess

import pytest

from fixtures.tiny_vlms import make_tiny_vlm

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_ARGS = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--dtype", "float32", "--bf16", "false",
            "--report_to", "none", "--save_strategy", "no", "--dataloader_num_workers", "0",
            "--logging_steps", "1", "--disable_tqdm", "true"]
# script -> (family, extra settings for a tiny model, the freeze table's modes: vision, connector, llm)
SCRIPTS = {
    "llava_hf_lora.sh": ("llava", [], ("frozen", "full", "lora")),
    # The recipe's pixel budget is for 28-px patches of a real image; the tiny tower's images are 48 px.
    "qwen25vl_lora.sh": ("qwen2_5_vl", ["--min_pixels", "3136", "--max_pixels", "12544"], ("frozen", "full", "lora")),
    "qwen25vl_qlora.sh": ("qwen2_5_vl", ["--min_pixels", "3136", "--max_pixels", "12544"], ("frozen", "full", "qlora")),
    "minicpmv46_lora.sh": ("minicpmv4_6", [], ("frozen", "full", "lora")),
    "smolvlm_full.sh": ("smolvlm", [], ("frozen", "full", "full")),
    "paligemma2_openpi.sh": ("paligemma", [], ("frozen", "full", "lora")),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_released_script_trains_two_steps(script, demo_data, tmp_path_factory):
    family, extra, modes = SCRIPTS[script]
    model = make_tiny_vlm(family, str(tmp_path_factory.getbasetemp() / "tiny_vlms" / family))
    out = str(tmp_path_factory.mktemp(script.removesuffix(".sh")))
    env = {**os.environ, "NPROC": "1", "MODEL": model, "DATA": demo_data["train"], "IMAGES": demo_data["image_folder"],
           "OUT": out, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", os.path.join(REPO_ROOT, "scripts", script), *CPU_ARGS, *extra],
                            capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, f"{script}: exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    with open(os.path.join(out, "freeze_table.txt")) as f:
        table = {line.split()[0]: line.split()[1] for line in f.read().splitlines()[1:4]}
    assert (table["vision"], table["connector"], table["llm"]) == modes, table
    assert os.path.isfile(os.path.join(out, "vlm_manifest.json"))
    assert "'loss'" in result.stdout  # it logged the two steps


@pytest.mark.slow
@pytest.mark.parametrize("shape, config, connector, llm_lora, header", [
    # LLaVA-1.5-7B: the mlp2x_gelu projector's 21.0M and LoRA r=128's 319.8M (LLaVA's own figures);
    # a 336 px image is 24 x 24 = 576 tokens.
    ("llava-1.5-7b-hf", "llava_hf_lora", 20_979_712, 319_815_680, "batch 16 x 2048 tokens (576 image + 1472 text)"),
    # Qwen2.5-VL at the recipe's max_pixels 1,003,520 = 5,120 patches of 14 px, merged 2 x 2: 1,280.
    ("qwen2.5-vl-7b-instruct", "qwen25vl_lora", 44_574_464, 161_480_704, "batch 4 x 4096 tokens (1280 image + 2816 text)"),
])
def test_a_7b_released_recipe_plans_from_configs_alone(shape, config, connector, llm_lora, header, tmp_path):
    """--dry_run builds a released VLM on the meta device from its config.json (configs/shapes/):
    no weights, no download, the recipe's table and its memory plan."""
    result = subprocess.run(
        ["python", "train.py", f"configs/{config}.yaml", "--vlm_model", f"configs/shapes/{shape}", "--dry_run", "true",
         "--report_to", "none", "--output_dir", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line.split()[:1] in
            (["vision"], ["connector"], ["llm"])}
    assert rows["vision"][0] == "frozen" and rows["connector"][:3] == ["full", f"{connector:,}", f"{connector:,}"]
    assert rows["llm"][0] == "lora" and rows["llm"][2] == f"{llm_lora:,}"
    assert header in result.stdout
    adamw = next(line for line in result.stdout.splitlines() if line.startswith("AdamW states"))
    assert adamw.endswith(f" {8 * (connector + llm_lora) / 2**30:.2f} GiB")  # two fp32 moments per trainable value
    assert "activations, checkpointing on" in result.stdout and "note:" not in result.stdout
