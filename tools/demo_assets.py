"""The built-in demo's assets: a seeded tiny base and the synthetic shapes set, so that the demo
downloads nothing. Made where configs/demo.yaml names them, when a run names those same paths
and they are absent (`train.py` with no arguments, or `train.py configs/demo.yaml ...`); a run
that names its own base and data never builds anything here."""

from __future__ import annotations

import os

import yaml

from constants import DEMO_CONFIG
from tools.synthetic import make_demo_dataset, vocabulary
from tools.tiny_base import make_tiny_base

# The README's demo figures (held-out accuracy on 200 records, samples/s) are measured on these.
DEMO_TRAIN_RECORDS, DEMO_EVAL_RECORDS = 10_000, 200


def demo_settings() -> dict:
    with open(DEMO_CONFIG) as f:
        return yaml.safe_load(f)


def make_missing_demo_assets(model_args, data_args) -> None:
    """The tiny base (seed 0) if the run's towers are the demo's and one is absent; the shapes set
    (train.json and eval.json beside it) if the run's data_path is the demo's and absent."""
    demo = demo_settings()
    towers = (model_args.vision_model, model_args.llm_model)
    if towers == (demo["vision_model"], demo["llm_model"]) and not all(map(os.path.isdir, towers)):
        make_tiny_base(os.path.dirname(demo["llm_model"]), vocabulary(), seed=0)
    if data_args.data_path == demo["data_path"] and not os.path.isfile(demo["data_path"]):
        make_demo_dataset(os.path.dirname(demo["data_path"]), DEMO_TRAIN_RECORDS, DEMO_EVAL_RECORDS)
