"""Plain helpers the test files import (`from helpers import tiny_model_args`)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from config import DataArguments, ModelArguments
from data.inputs import ComposedInputs
from data.validate import check_training_data
from run.fingerprint import base_name


def tiny_model_args(tiny_base: dict, **overrides) -> ModelArguments:
    """ModelArguments for the tiny base fixture; `overrides` are any ModelArguments fields.
    The defaults (frozen tower and LLM, trainable connector) pass the conflict checks."""
    return ModelArguments(vision_model=tiny_base["vision"], llm_model=tiny_base["llm"], **overrides)


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
SUBPROCESS_ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
LORA_AND_CONNECTOR = ["--freeze_vit", "true", "--freeze_llm", "true", "--lora_enable", "true"]


def torchrun_train(nproc: int, tiny_base, demo_data, out, *extra, eval_data: str = "") -> str:
    """3 steps of train.py on the tiny base under `torchrun --nproc_per_node=nproc`, a global batch
    of 4 whatever nproc is (so runs on 1 and 2 ranks can be compared); returns stdout."""
    argv = [
        TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "train.py", "configs/demo.yaml",
        "--vision_model", tiny_base["vision"], "--llm_model", tiny_base["llm"],
        "--data_path", demo_data["train"], "--image_folder", demo_data["image_folder"],
        "--eval_data_path", eval_data, "--output_dir", str(out), "--max_steps", "3", "--warmup_steps", "0",
        "--disable_tqdm", "true", "--per_device_train_batch_size", str(4 // nproc), *extra,
    ]
    result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=SUBPROCESS_ENV)
    # 8000: a rank killed by a signal ends its stderr with faulthandler's stacks, then the launcher's report.
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-8000:]}"
    return result.stdout


def save_video(path, count, size=48) -> str:
    """An mp4 (MPEG-4 Part 2, an encoder every PyAV wheel carries) of `count` frames at 5 fps, frame
    i solid (40 * i, 0, 0): a decoded frame says which it is, within the codec's rounding."""
    import av

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(count):
            frame = np.zeros((size, size, 3), np.uint8)
            frame[..., 0] = 40 * i
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush
    return path


# Where each family keeps its parts, in transformers' parameter names (docs/released_vlm_families.md).
# The connector is checked first: Qwen2.5-VL's merger sits inside its vision module.
_LLM = ("model.language_model.", "lm_head.")
_LLAVA_LIKE = {"connector": ("model.multi_modal_projector.",), "vision": ("model.vision_tower.",), "llm": _LLM}
_QWEN_LIKE = {"connector": ("model.visual.merger.",), "vision": ("model.visual.",), "llm": _LLM}
_SMOLVLM_LIKE = {"connector": ("model.connector.",), "vision": ("model.vision_model.",),
                 "llm": ("model.text_model.", "lm_head.")}
_MINICPMV_LIKE = {"connector": ("model.merger.",), "vision": ("model.vision_tower.",), "llm": _LLM}
_ANYRES = {**_LLAVA_LIKE, "connector": ("model.multi_modal_projector.", "model.image_newline")}
PARTS = {
    "llava": _LLAVA_LIKE, "llava_next": _ANYRES, "llava_onevision": _ANYRES, "mistral3": _LLAVA_LIKE,
    "qwen2_5_vl": _QWEN_LIKE, "qwen3_5": _QWEN_LIKE,
    "qwen3_vl": {**_QWEN_LIKE, "connector": ("model.visual.merger.", "model.visual.deepstack_merger_list.")},
    "glm4v": {**_QWEN_LIKE, "connector": ("model.visual.merger.", "model.visual.downsample.")},
    "paligemma": _LLAVA_LIKE, "gemma3": _LLAVA_LIKE,
    "gemma4": {"connector": ("model.embed_vision.",), "vision": ("model.vision_tower.",), "llm": _LLM},
    "smolvlm": _SMOLVLM_LIKE, "idefics3": _SMOLVLM_LIKE, "lfm2_vl": _LLAVA_LIKE, "internvl": _LLAVA_LIKE,
    "minicpmv4_6": _MINICPMV_LIKE, "minicpmv4_7": _MINICPMV_LIKE,
}


def part_of(family: str, name: str) -> str:
    """The component a parameter of our model belongs to, by transformers' own name for it."""
    plain = base_name(name.removeprefix("vlm."))
    for part in ("connector", "vision", "llm"):
        if plain.startswith(PARTS[family][part]):
            return part
    raise AssertionError(f"{family}: {name} ({plain}) is in no part")


# --- answers and stops: a short real train.py run, then infer.py --data (tests/test_stopping.py) --

COLOR_QUESTION = "What color are the shapes?"
# Enough to learn the colour question to >= 0.9 held-out on a tiny base, with the LLM training.
ANSWER_AND_STOP_FLAGS = [
    "--num_train_epochs", "4", "--per_device_train_batch_size", "8", "--learning_rate", "1e-3",
    "--warmup_steps", "0", "--lr_scheduler_type", "constant", "--max_length", "256",
    "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--seed", "0",
    "--dataloader_num_workers", "0", "--logging_steps", "1000",
]


def make_color_set(folder: str, train_size: int = 64, eval_size: int = 16, seed: int = 0) -> dict:
    """{"train", "eval": json, "image_folder": dir}: the demo's shape images (fixtures/synthetic.py),
    each asked one question, their colour: one word out of four, learnt in a few hundred samples."""
    import json
    import random

    from fixtures.synthetic import make_image

    rng = random.Random(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    paths = {"image_folder": folder}
    for split, size in (("train", train_size), ("eval", eval_size)):
        records = []
        for i in range(size):
            image, facts = make_image(rng)
            name = f"images/{split}-{i:04d}.png"
            image.save(os.path.join(folder, name))
            conversation = [{"from": "human", "value": "<image>\n" + COLOR_QUESTION}, {"from": "gpt", "value": facts["color"]}]
            records.append({"id": f"{split}-{i}", "image": name, "conversations": conversation})
        paths[split] = os.path.join(folder, f"{split}.json")
        with open(paths[split], "w") as f:
            json.dump(records, f)
    return paths


def train_and_answer(base_flags: list[str], workdir: str, *train_flags: str, data: dict | None = None) -> dict:
    """A model trained on a small set must answer *and stop*. Runs the real train.py (a subprocess)
    on `base_flags` (["--vision_model", V, "--llm_model", L] or ["--vlm_model", DIR]) plus
    `train_flags` (the recipe: what trains; the LLM must, see STACK.md trap 8) on `data`
    (`make_color_set` in `workdir` if None), then the real infer.py --data on its held-out records.
    Returns {"accuracy": float, "predictions": [{"id", "prediction", "answer"}], "checkpoint": dir}."""
    import json
    import re

    data = data or make_color_set(os.path.join(workdir, "data"))
    checkpoint, predictions = os.path.join(workdir, "run"), os.path.join(workdir, "predictions.jsonl")
    run_script("train.py", *base_flags, "--data_path", data["train"], "--image_folder", data["image_folder"],
               "--output_dir", checkpoint, "--data_check_cache", os.path.join(workdir, "cache"),
               *ANSWER_AND_STOP_FLAGS, *train_flags)
    stdout = run_script("infer.py", "--checkpoint", checkpoint, "--data", data["eval"],
                        "--image_folder", data["image_folder"], "--output", predictions)
    with open(predictions) as f:
        results = [json.loads(line) for line in f]
    accuracy = float(re.search(r"accuracy: ([0-9.]+)", stdout).group(1))
    return {"accuracy": accuracy, "predictions": results, "checkpoint": checkpoint}


def run_script(*argv: str, timeout: int = 600) -> str:
    """A script of the repository as a subprocess in its root (one thread, no network); its stdout."""
    result = subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=timeout, env=SUBPROCESS_ENV)
    assert result.returncode == 0, f"{argv[0]} exited {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def assert_answers_end_with_a_stop(labels: list[int], answers: list[str], stop_ids: list[int], tokenizer) -> None:
    """The supervised runs of one row's `labels` are its `answers`, in order, each followed by a stop
    id: what a model learns from them, it answers and then stops where generation stops."""
    runs, run = [], []
    for label in [*labels, -100]:
        if label != -100:
            run.append(label)
        elif run:
            runs, run = [*runs, run], []
    assert len(runs) == len(answers), [tokenizer.decode(r) for r in runs]
    for run, answer in zip(runs, answers, strict=True):
        stops = [i for i, token in enumerate(run) if token in stop_ids]
        assert stops, f"no stop id {stop_ids} in the supervised {tokenizer.decode(run)!r}"
        assert tokenizer.decode(run[: stops[0]], skip_special_tokens=True).strip() == answer, tokenizer.decode(run)


def data_args(path, folder, tmp_path, **overrides) -> DataArguments:
    """Data settings for a check of `path` whose cache lies under `tmp_path`."""
    return DataArguments(data_path=path, image_folder=folder, max_length=256,
                         data_check_cache=str(tmp_path / "cache"), **overrides)


def check_training(args, tokenizer, num_image_tokens: int, image_token: int, output_dir):
    """The check training runs on a composed base's records: the positions it leaves out."""
    settings = ComposedInputs(tokenizer, None, num_image_tokens, image_token).pass_settings(args)
    return check_training_data(args, settings, output_dir)[1]
