"""Evaluation during training and the curves it leaves: with --eval_data_path and --eval_steps,
train.py scores generated answers (exact match, as infer.py answers) on a seeded sample of
--eval_max_samples held-out records every eval_steps, and logs `eval_accuracy` to the Trainer's
loggers (tensorboard here) and into trainer_state.json; every run logs at least its last loss;
the web page plots the accuracy beside the loss and says what is missing when there is no loss.

Composed base: `VLMTrainer.evaluate` in-process, train.py as a subprocess, and 2-rank DDP.
Released VLM (qwen2_5_vl): `VLMTrainer.evaluate` and train.py's main, in-process."""

from __future__ import annotations

import copy
import glob
import json
import os
import subprocess
import sys

import gradio as gr
import pytest
from helpers import REPO_ROOT, SUBPROCESS_ENV, tiny_model_args, torchrun_train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

import scripts.web_demo_panel
import train
from cli import parse_config
from config import DEFAULT_EVAL_STEPS, TrainArguments
from data.dataset import read_records
from errors import ConfigError
from model.settings import ModelArguments
from run.checkpoint import load_base
from run.inputs import model_inputs
from run.predict import HeldOut
from run.trainer import VLMTrainer

TIMEOUT_S = 600  # a hang guard on a shared machine, not a benchmark


def read_state(out) -> dict:
    with open(os.path.join(out, "trainer_state.json")) as f:
        return json.load(f)


def logged(state: dict, key: str) -> dict[int, dict]:
    """step -> the log_history entry holding `key`."""
    return {e["step"]: e for e in state["log_history"] if key in e}


# --- settings ---------------------------------------------------------------------------------


def test_eval_steps_alone_turns_evaluation_on_and_strategy_alone_evaluates_a_tenth(tmp_path, demo_data):
    held_out = ["--output_dir", str(tmp_path), "--eval_data_path", demo_data["eval"]]
    _, data_args, args = parse_config([*held_out, "--eval_steps", "7"])
    assert args.eval_strategy == "steps" and args.eval_steps == 7 and data_args.eval_max_samples == 200
    # Not transformers' fallback to logging_steps: a hundred generation passes at its default.
    _, _, args = parse_config([*held_out, "--eval_strategy", "steps"])
    assert args.eval_steps == DEFAULT_EVAL_STEPS == 0.1
    _, _, args = parse_config(held_out)
    assert args.eval_strategy == "no"


def test_evaluation_without_held_out_records_is_refused_before_anything_loads(tmp_path):
    with pytest.raises(ConfigError, match="--eval_data_path is empty"):
        parse_config(["--output_dir", str(tmp_path), "--eval_steps", "5"])


@pytest.mark.parametrize("engine, flags", [
    ("FSDP", ["--fsdp", "full_shard auto_wrap"]),
    ("ZeRO-3", ["--deepspeed", os.path.join(REPO_ROOT, "configs", "deepspeed", "zero3.json")]),
])
def test_evaluation_under_sharded_weights_is_refused_naming_the_way_out(engine, flags, tmp_path, demo_data):
    if engine == "ZeRO-3":
        pytest.importorskip("deepspeed")
    argv = ["--output_dir", str(tmp_path), "--eval_data_path", demo_data["eval"], "--eval_steps", "5", *flags]
    try:
        with pytest.raises(ConfigError) as refused:
            parse_config(argv)
        parse_config(argv[:4] + flags)  # the same engine without evaluation during training is fine
    finally:
        unset_hf_deepspeed_config()  # or later tests in this process would build under zero.Init
    message = str(refused.value)
    assert engine in message and "infer.py --checkpoint" in message and demo_data["eval"] in message


def test_logging_steps_default_is_a_fraction_of_the_run_and_a_configs_count_is_kept(tmp_path):
    # transformers' 500 left every run shorter than 500 steps without a loss curve.
    assert TrainArguments(output_dir=str(tmp_path)).logging_steps == 0.01
    _, _, args = parse_config([os.path.join(REPO_ROOT, "configs", "demo.yaml")])
    assert args.logging_steps == 25


def test_sample_is_seeded_bounded_and_in_file_order():
    held_out = HeldOut([{"id": i} for i in range(50)], None, None)
    sample = held_out.sample(10, seed=0)
    ids = [r["id"] for r in sample.records]
    assert len(ids) == 10 and ids == sorted(ids)
    assert sample.records == held_out.sample(10, seed=0).records  # every rank, every evaluation
    assert sample.records != held_out.sample(10, seed=1).records
    assert held_out.sample(0, seed=0) is held_out and held_out.sample(500, seed=0) is held_out


# --- VLMTrainer.evaluate, both kinds of base, in-process -----------------------------------


@pytest.fixture(params=["composed", "released"])
def base(request, tiny_base, released_vlm):
    """(model, its inputs object) as train.py builds them."""
    if request.param == "composed":
        args = tiny_model_args(tiny_base)
    else:
        args = ModelArguments(vlm_model=released_vlm("qwen2_5_vl"))
    model = load_base(args)
    return model, model_inputs(model, args)


def with_answers(records: list[dict], answers: list[str]) -> list[dict]:
    records = copy.deepcopy(records)
    for record, answer in zip(records, answers, strict=True):
        record["conversations"][1]["value"] = answer
    return records


def test_evaluate_scores_generated_answers_logs_them_and_resumes_training_mode(base, demo_data, tmp_path):
    model, inputs = base
    records = read_records(demo_data["eval"])[:4]
    model.eval()
    predictions = [r["prediction"] for r in HeldOut(records, demo_data["image_folder"], inputs).predict(model)]
    # Two records whose answer is what the model says, two whose answer it cannot be.
    answers = predictions[:2] + [p + " and more" for p in predictions[2:]]
    held_out = HeldOut(with_answers(records, answers), demo_data["image_folder"], inputs)
    args = TrainArguments(output_dir=str(tmp_path), report_to="none", eval_strategy="steps", eval_steps=1)
    trainer = VLMTrainer(model=model, args=args, eval_dataset=held_out, processing_class=inputs.processing_class)

    model.train()
    metrics = trainer.evaluate()
    assert metrics["eval_accuracy"] == 0.5 and metrics["eval_samples"] == 4
    assert model.training  # evaluated in eval mode, handed back to training as it was
    assert trainer.state.log_history[-1]["eval_accuracy"] == 0.5  # -> trainer_state.json


def test_released_vlm_train_py_evaluates_every_eval_steps_and_logs_every_step(released_vlm, released_data, tmp_path):
    out = str(tmp_path / "out")
    train.main([
        "--vlm_model", released_vlm("qwen2_5_vl"), "--data_path", released_data["train"],
        "--image_folder", released_data["image_folder"], "--eval_data_path", released_data["eval"],
        "--eval_steps", "1", "--eval_max_samples", "1", "--output_dir", out, "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no",
        "--disable_tqdm", "true", "--data_check_cache", str(tmp_path / "cache"),
    ])
    state = read_state(out)
    evaluations = logged(state, "eval_accuracy")
    assert sorted(evaluations) == [1, 2] and all(e["eval_samples"] == 1 for e in evaluations.values())
    # No logging_steps given: the default fraction (0.01 of 2 steps) logs every step.
    assert sorted(logged(state, "loss")) == [1, 2]


# --- train.py on the composed base: subprocess, one and two ranks ---------------------------


@pytest.fixture(scope="module")
def composed_run(tiny_base, demo_data, tmp_path_factory) -> str:
    """configs/demo.yaml (logging_steps 25) for 4 steps, evaluating 4 records every 2 steps."""
    out = str(tmp_path_factory.mktemp("eval_run") / "run")
    result = subprocess.run(
        [sys.executable, "train.py", "configs/demo.yaml",
         "--vision_model", tiny_base["vision"], "--llm_model", tiny_base["llm"],
         "--data_path", demo_data["train"], "--image_folder", demo_data["image_folder"],
         "--eval_data_path", demo_data["eval"], "--output_dir", out, "--per_device_train_batch_size", "4",
         "--eval_strategy", "steps", "--eval_steps", "2", "--max_steps", "4", "--eval_max_samples", "4",
         "--report_to", "tensorboard", "--disable_tqdm", "true"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, env=SUBPROCESS_ENV,
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    assert "held-out accuracy" in result.stdout  # the evaluation after training still runs, on all 16
    return out


@pytest.mark.slow
def test_eval_accuracy_is_in_trainer_state_at_every_eval_step(composed_run):
    state = read_state(composed_run)
    evaluations = logged(state, "eval_accuracy")
    assert sorted(evaluations) == [2, 4]
    assert all(e["eval_samples"] == 4 and 0 <= e["eval_accuracy"] <= 1 for e in evaluations.values())
    # 4 steps, logging_steps 25: only the last step's loss, which every run now logs.
    assert sorted(logged(state, "loss")) == [4]


@pytest.mark.slow
def test_eval_accuracy_reaches_tensorboard(composed_run):
    (events,) = glob.glob(os.path.join(composed_run, "runs", "*", "events.out.tfevents.*"))
    scalars = EventAccumulator(events).Reload().Scalars("eval/accuracy")  # transformers' name for eval_accuracy
    evaluations = logged(read_state(composed_run), "eval_accuracy")
    assert [(s.step, s.value) for s in scalars] == [
        (step, pytest.approx(e["eval_accuracy"])) for step, e in sorted(evaluations.items())
    ]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_answer_the_sample_together_and_log_one_accuracy(tiny_base, demo_data, tmp_path):
    """Each rank answers its share (5 records: 3 and 2), all gather: neither waits on the other
    generating, and the logged count is the whole sample's."""
    out = tmp_path / "ddp"
    torchrun_train(2, tiny_base, demo_data, out, "--eval_steps", "3", "--eval_max_samples", "5",
                   eval_data=demo_data["eval"])
    evaluations = logged(read_state(out), "eval_accuracy")
    assert list(evaluations) == [3] and evaluations[3]["eval_samples"] == 5


# --- the web page's curves --------------------------------------------------------------------


@pytest.fixture(scope="module")
def web_demo():
    """The page's side panel (scripts/web_demo_panel.py)."""
    return scripts.web_demo_panel


def curves(web_demo, state: dict) -> dict:
    """elem_id -> component of the page's curve panel for this trainer_state.json."""
    with gr.Blocks() as blocks:
        web_demo.training_curves(state)
    return {b.elem_id: b for b in blocks.blocks.values() if getattr(b, "elem_id", None)}


def test_page_says_the_state_holds_no_loss_rather_than_that_it_is_absent(web_demo):
    short = {"global_step": 3, "max_steps": 3, "logging_steps": 25,
             "log_history": [{"train_runtime": 1.0, "train_loss": 2.5, "step": 3}]}
    shown = curves(web_demo, short)
    assert "loss-plot" not in shown
    note = shown["loss-note"].value
    assert "trainer_state.json holds no logged loss" in note and "3 steps were fewer than logging_steps=25" in note
    assert "no trainer_state.json" in curves(web_demo, {})["loss-note"].value  # really absent


def test_page_plots_eval_accuracy_beside_the_loss(web_demo):
    state = {"global_step": 4, "max_steps": 4, "logging_steps": 1, "log_history": [
        {"loss": 3.0, "step": 1}, {"loss": 2.0, "step": 2}, {"eval_accuracy": 0.25, "eval_samples": 4, "step": 2},
        {"loss": 1.0, "step": 4}, {"eval_accuracy": 0.75, "eval_samples": 4, "step": 4},
    ]}
    assert web_demo.accuracy_history(state)[["step", "accuracy"]].values.tolist() == [[2, 0.25], [4, 0.75]]
    shown = curves(web_demo, state)
    assert isinstance(shown["loss-plot"], gr.LinePlot) and isinstance(shown["accuracy-plot"], gr.LinePlot)
    assert shown["accuracy-plot"].title == "held-out accuracy: 0.750 at step 4 (4 records)"
    # One point (a run evaluated once, or logged only its last loss) is drawn as a dot.
    one = {"global_step": 4, "logging_steps": 25, "log_history": [{"loss": 1.0, "step": 4}]}
    assert isinstance(curves(web_demo, one)["loss-plot"], gr.ScatterPlot)
