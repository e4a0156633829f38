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
    # The current models' recipes (planned from their real shapes below); the tiny Qwen towers' 8-px
    # patches merged 2 x 2 take 48-px images within 32^2..64^2 px.
    "qwen3vl_lora.sh": ("qwen3_vl", ["--min_pixels", "1024", "--max_pixels", "4096"], ("frozen", "full", "lora")),
    "qwen35_lora.sh": ("qwen3_5", ["--min_pixels", "1024", "--max_pixels", "4096"], ("frozen", "full", "lora")),
    "gemma3_qlora.sh": ("gemma3", [], ("frozen", "full", "qlora")),
    "internvl35_lora.sh": ("internvl", [], ("frozen", "full", "lora")),
    "llava_onevision_lora.sh": ("llava_onevision", [], ("frozen", "full", "lora")),
}


@pytest.mark.slow  # a train.py subprocess each
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


# The current models' recipes, each planned through its own script from the model's config.json
# (configs/shapes/): no weights, no download. script -> (shape, the freeze table's modes, the
# model's published size in parameters, the plan's batch line).
CURRENT_RECIPES = {
    # 8.77B (the hub's count); the connector is the merger and the three DeepStack mergers.
    "qwen3vl_lora.sh": ("qwen3-vl-8b-instruct", ("frozen", "full", "lora"), 8.77e9,
                        "batch 4 x 4096 tokens (1280 image + 2816 text)"),  # 1,310,720 px / 16^2 / 2x2 merge
    # The checkpoint holds 9.65B (19,306,216,416 bytes of bf16), 0.24B of them its multi-token
    # prediction head (`mtp.*`: one decoder layer and its fc), which transformers does not load.
    "qwen35_lora.sh": ("qwen3.5-9b", ("frozen", "full", "lora"), 9.65e9 - 0.243e9,
                       "batch 2 x 4096 tokens (1280 image + 2816 text)"),
    # 4.30B; 896 px / 14 = 64^2 patches, average-pooled to 256 tokens.
    "gemma3_qlora.sh": ("gemma-3-4b-it", ("frozen", "full", "qlora"), 4.30e9,
                        "batch 8 x 2048 tokens (256 image + 1792 text)"),
    # 8.53B (an untied head: 622M of them); a 448-px tile is 32^2 patches, pixel-shuffled 2x2 to 256.
    "internvl35_lora.sh": ("internvl3_5-8b-hf", ("frozen", "full", "lora"), 8.53e9,
                           "batch 4 x 4096 tokens (256 image + 3840 text)"),
    # 8.03B; a 384-px tile is 27^2 patches of 14 px (the border short of a patch dropped).
    "llava_onevision_lora.sh": ("llava-onevision-qwen2-7b-ov-hf", ("frozen", "full", "lora"), 8.03e9,
                                "batch 2 x 8192 tokens (729 image + 7463 text)"),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(CURRENT_RECIPES))
def test_a_current_recipe_plans_from_its_shape_through_its_script(script, tmp_path):
    """`bash scripts/X.sh --dry_run true` with MODEL at the shape: its freeze table and memory plan,
    QLoRA's too, and the model it builds is the published one, within 1% of its size."""
    shape, modes, published, header = CURRENT_RECIPES[script]
    env = {**os.environ, "NPROC": "1", "MODEL": f"configs/shapes/{shape}", "OUT": str(tmp_path),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", os.path.join(REPO_ROOT, "scripts", script), "--dry_run", "true", "--report_to", "none"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, f"{script}: exit {result.returncode}\n{result.stderr[-4000:]}"
    assert sorted(os.listdir(tmp_path)) == ["config.yaml", "freeze_table.txt", "memory_plan.txt"]
    with open(tmp_path / "freeze_table.txt") as f:
        rows = {line.split()[0]: line.split()[1:] for line in f.read().splitlines()[1:]}
    assert (rows["vision"][0], rows["connector"][0], rows["llm"][0]) == modes, rows
    lora = int(rows["llm"][2].replace(",", ""))  # the LLM trains its adapters alone; the totals count them
    base = int(rows["all"][0].replace(",", "")) - lora
    assert abs(base / published - 1) < 0.01, f"{shape}: {base:,} parameters, published {published:,.0f}"
    with open(tmp_path / "memory_plan.txt") as f:
        plan = f.read()
    assert plan in result.stdout and header in plan
    assert ("weights nf4 4-bit" in plan) == (modes[2] == "qlora")
    trainable = int(rows["all"][1].replace(",", ""))
    value, unit = next(line for line in plan.splitlines() if line.startswith("AdamW states")).split()[-2:]
    adamw = float(value) * 2 ** (10 * ["B", "KiB", "MiB", "GiB"].index(unit))
    assert adamw == pytest.approx(8 * trainable, rel=5e-3)  # two fp32 moments per trainable value (to 2 digits)
