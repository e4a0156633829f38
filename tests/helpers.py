"""Plain helpers the test files import (`from helpers import tiny_model_args`)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from config import ModelArguments


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
        "--build_tiny_base_if_missing", "false", "--make_demo_data_if_missing", "false",
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
