"""Plain helpers the test files import (`from helpers import tiny_model_args`)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from config import ModelArguments
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
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
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
PARTS = {
    "llava": {"connector": ("model.multi_modal_projector.",), "vision": ("model.vision_tower.",),
              "llm": ("model.language_model.", "lm_head.")},
    "qwen2_5_vl": {"connector": ("model.visual.merger.",), "vision": ("model.visual.",),
                   "llm": ("model.language_model.", "lm_head.")},
    "smolvlm": {"connector": ("model.connector.",), "vision": ("model.vision_model.",),
                "llm": ("model.text_model.", "lm_head.")},
    "paligemma": {"connector": ("model.multi_modal_projector.",), "vision": ("model.vision_tower.",),
                  "llm": ("model.language_model.", "lm_head.")},
    "minicpmv4_6": {"connector": ("model.merger.",), "vision": ("model.vision_tower.",),
                    "llm": ("model.language_model.", "lm_head.")},
}


def part_of(family: str, name: str) -> str:
    """The component a parameter of our model belongs to, by transformers' own name for it."""
    plain = base_name(name.removeprefix("vlm."))
    for part in ("connector", "vision", "llm"):
        if plain.startswith(PARTS[family][part]):
            return part
    raise AssertionError(f"{family}: {name} ({plain}) is in no part")
