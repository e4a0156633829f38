"""Every launch script in scripts/ runs for real on the tiny base: its model ids, data and output
are overridden through the variables at its top, and two training steps through its arguments.
The scripts are thin (settings live in configs/), so this checks that they and their configs
stay in step with train.py. Every file in scripts/ is exercised by some test; every Python entry
point runs by its path in tests/test_first_impressions.py."""

from __future__ import annotations

import ast
import glob
import os
import re
import subprocess
import sys

import pytest
import yaml

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(REPO_ROOT, "scripts", "*.sh")))

# fp32 and no wandb on a CPU; everything else as the recipe says.
CPU_ARGS = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--dtype", "float32",
            "--bf16", "false", "--report_to", "none", "--save_strategy", "no", "--dataloader_num_workers", "0"]


def names_used(source: str) -> set[str]:
    """What a Python file names: its imported modules and its string constants (docstrings not:
    a test that only describes a script does not run it)."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            used.add(node.value)
        elif isinstance(node, ast.Import):
            used |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            used |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return used


def names(text: str, script: str) -> bool:
    """Whether `text` names scripts/`script`: `llava15.sh`, `scripts/check_data.py`, `scripts.check_data`."""
    stem = script.rsplit(".", 1)[0]
    by_file = rf"(?<![\w.]){re.escape(script)}(?!\w)"
    by_module = rf"(?<![\w.])scripts\.{re.escape(stem)}(?![\w])"
    return bool(re.search(by_file, text) or (script.endswith(".py") and re.search(by_module, text)))


def exercised_scripts(test_sources: dict[str, str], script_sources: dict[str, str]) -> set[str]:
    """The files of scripts/ some test runs or imports, and those these in turn run (launch.sh, which
    every recipe script execs; a module a benchmark imports)."""
    used = set().union(*(names_used(source) for source in test_sources.values()))
    found = {script for script in script_sources if any(names(u, script) for u in used)}
    while True:
        more = {s for s in script_sources if s not in found and any(names(script_sources[f], s) for f in found)}
        if not more:
            return found
        found |= more


def read_folder(folder: str, pattern: str) -> dict[str, str]:
    sources = {}
    for path in sorted(glob.glob(os.path.join(REPO_ROOT, folder, pattern))):
        with open(path) as f:
            sources[os.path.basename(path)] = f.read()
    return sources


def test_every_file_in_scripts_is_exercised_by_a_test():
    scripts = {name: text for name, text in read_folder("scripts", "*").items() if name != "__init__.py"}
    assert sorted(set(scripts) - exercised_scripts(read_folder("tests", "*.py"), scripts)) == []


def test_a_script_named_only_in_a_docstring_or_by_a_longer_name_is_not_exercised():
    tests = {"test_x.py": '"""Runs scripts/b.py."""\nimport scripts.c\nRUN = ["bash", "scripts/qwen_a.sh"]\n'}
    scripts = {"a.sh": "", "qwen_a.sh": "exec bash launch.sh", "launch.sh": "", "b.py": "", "c.py": "", "d.py": ""}
    assert exercised_scripts(tests, scripts) == {"qwen_a.sh", "launch.sh", "c.py"}


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


@pytest.mark.slow
def test_llava15_two_stages(stage1):
    assert manifest_exists(os.path.join(stage1, "pretrain")) and manifest_exists(os.path.join(stage1, "finetune"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llava15_lora.sh", "qlora.sh", "minicpmv.sh", "openpi.sh"])
def test_single_stage_script(name, stage1, tiny_base, demo_data, tmp_path):
    out = str(tmp_path / "out")
    # llava15_lora.yaml starts from the stage-1 projector; the others start from the base.
    init_from = {"INIT_FROM": os.path.join(stage1, "pretrain")} if name == "llava15_lora.sh" else {}
    run_script(name, tiny_base, demo_data, out, **init_from)
    assert manifest_exists(out)


@pytest.mark.slow
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


@pytest.mark.slow
def test_make_tiny_base_writes_a_base_that_loads_like_a_hub_id(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    result = subprocess.run([sys.executable, "-m", "scripts.make_tiny_base", "--out", str(tmp_path), "--vision", "siglip"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert AutoConfig.from_pretrained(str(tmp_path / "vision")).model_type.startswith("siglip")
    assert AutoTokenizer.from_pretrained(str(tmp_path / "llm")).chat_template
