"""The real scripts, end to end on the tiny base: `train.py configs/demo.yaml` for three steps,
then `infer.py` on its checkpoint, one question and a whole file. Each run is a subprocess
(about 10 s of imports each), so there is one run of each mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from data.media import load_image
from run.checkpoint import load_checkpoint
from run.predict import MAX_NEW_TOKENS, generate_answers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600  # generous: the machine is shared, and this is a hang guard, not a benchmark


def run_script(*argv: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, *argv],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env={**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, f"{argv[0]} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def trained(tiny_base, demo_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("train_out") / "run")
    result = run_script(
        "train.py", "configs/demo.yaml",
        "--vision_model", tiny_base["vision"],
        "--llm_model", tiny_base["llm"],
        "--data_path", demo_data["train"],
        "--image_folder", demo_data["image_folder"],
        "--eval_data_path", demo_data["eval"],
        "--output_dir", out,
        "--max_steps", "3",
        "--num_train_epochs", "1",
        "--per_device_train_batch_size", "4",
        "--freeze_vit", "true",  # the demo trains its tower; here a frozen one must stay out of the delta
    )
    return out, result


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_train_writes_the_checkpoint_and_reports_accuracy(trained, tiny_base, demo_data):
    out, result = trained
    for name in ("config.yaml", "freeze_table.txt", "vlm_manifest.json", "delta.safetensors", "eval_predictions.jsonl"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert "held-out accuracy" in result.stdout
    # demo.yaml logs every 25 steps: a 3-step run still leaves its last step's loss (LogLastStep).
    with open(os.path.join(out, "trainer_state.json")) as f:
        assert [e["step"] for e in json.load(f)["log_history"] if "loss" in e] == [3]

    # The resolved config holds the command line's overrides on top of demo.yaml.
    with open(os.path.join(out, "config.yaml")) as f:
        resolved = yaml.safe_load(f)
    assert resolved["model"]["llm_model"] == tiny_base["llm"]
    assert resolved["train"]["max_steps"] == 3
    assert resolved["model"]["freeze_llm"] is False  # from demo.yaml

    with open(os.path.join(out, "freeze_table.txt")) as f:
        table = f.read()
    assert [line.split()[:2] for line in table.splitlines()[1:4]] == [
        ["vision", "frozen"], ["connector", "full"], ["llm", "full"]
    ]

    # The delta holds what trained (connector + LLM), not the frozen tower, and it moved.
    with open(os.path.join(out, "vlm_manifest.json")) as f:
        manifest = json.load(f)
    delta = load_file(os.path.join(out, "delta.safetensors"))
    assert set(delta) == set(manifest["tensors"])
    assert {name.split(".", 1)[0] for name in delta} == {"connector", "llm"}
    base_llm = load_file(os.path.join(tiny_base["llm"], "model.safetensors"))
    embed = "model.embed_tokens.weight"
    assert not torch.equal(delta[f"llm.{embed}"], base_llm[embed])

    # One prediction per held-out record, in order.
    with open(demo_data["eval"]) as f:
        records = json.load(f)
    predictions = read_jsonl(os.path.join(out, "eval_predictions.jsonl"))
    assert [p["id"] for p in predictions] == [r["id"] for r in records]
    assert [p["answer"] for p in predictions] == [r["conversations"][1]["value"] for r in records]


@pytest.mark.slow
def test_infer_answers_one_question(trained, demo_data):
    out, _ = trained
    with open(demo_data["eval"]) as f:
        record = json.load(f)[0]
    image = os.path.join(demo_data["image_folder"], record["image"])
    question = "What shape is shown?"
    result = run_script("infer.py", "--checkpoint", out, "--image", image, "--prompt", question)

    # The printed answer is what the one loader's model generates for the same prompt.
    model, inputs, _ = load_checkpoint(out)
    messages = [{"role": "user", "content": "<image>\n" + question}]
    (expected,) = generate_answers(model, inputs, [(messages, [load_image(image)])], max_new_tokens=MAX_NEW_TOKENS)
    assert expected  # 3 steps from a random base: not a good answer, but some text
    assert result.stdout.endswith(expected + "\n")  # the answer may span lines; it is printed last


@pytest.mark.slow
def test_infer_answers_a_data_file(trained, demo_data, tmp_path):
    out, _ = trained
    preds = str(tmp_path / "preds.jsonl")
    result = run_script(
        "infer.py", "--checkpoint", out,
        "--data", demo_data["eval"],
        "--image_folder", demo_data["image_folder"],
        "--output", preds,
        "--max_new_tokens", str(MAX_NEW_TOKENS),  # the one default, which train.py's evaluation uses too
    )
    with open(demo_data["eval"]) as f:
        records = json.load(f)
    rows = read_jsonl(preds)
    assert len(rows) == len(records)
    assert all(set(row) == {"id", "prediction", "answer"} for row in rows)
    assert [row["id"] for row in rows] == [r["id"] for r in records]

    accuracy_lines = [line for line in result.stdout.splitlines() if line.startswith("accuracy:")]
    assert len(accuracy_lines) == 1
    correct = sum(row["prediction"].strip().lower() == row["answer"].strip().lower() for row in rows)
    assert float(accuracy_lines[0].split()[1]) == pytest.approx(correct / len(rows), abs=1e-4)
    # The reloaded checkpoint answers exactly as the model did at the end of training.
    assert rows == read_jsonl(os.path.join(out, "eval_predictions.jsonl"))


@pytest.mark.slow
@pytest.mark.parametrize("report_to", ["wandb", "tensorboard"])
def test_training_logs_to_wandb_offline_and_tensorboard(report_to, tiny_base, demo_data, tmp_path):
    out = str(tmp_path / "run")
    result = subprocess.run(
        [sys.executable, "train.py", "configs/demo.yaml",
         "--vision_model", tiny_base["vision"], "--llm_model", tiny_base["llm"],
         "--data_path", demo_data["train"], "--image_folder", demo_data["image_folder"], "--eval_data_path", "",
         "--output_dir", out, "--max_steps", "2", "--logging_steps", "1", "--report_to", report_to],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT_S,
        env={**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    if report_to == "wandb":
        runs = [p for p in (tmp_path / "wandb").glob("offline-run-*") if list(p.glob("*.wandb"))]
        assert runs, "no offline wandb run was written"
    else:
        assert list((tmp_path / "run" / "runs").glob("*/events.out.tfevents.*"))
