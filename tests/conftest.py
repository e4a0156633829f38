"""Shared fixtures: a seeded tiny base (CLIP or SigLIP tower + Llama LLM) and a tiny shapes set,
each built once per session under pytest's temporary folder. Nothing is downloaded."""

from __future__ import annotations

import os
import sys

# Before anything imports transformers / wandb: no network, no wandb login, no fork warnings.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One OpenMP thread per process, inherited by every train.py / torchrun / bench subprocess: the
# suite runs a pytest worker per core, and two 2-thread processes on 2 cores spin-wait for each
# other (tiny matmuls ~50x slower, the CPU time counted all the same). A user's own setting wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
for path in (REPO_ROOT, TESTS_DIR):  # the repo's modules, and `from helpers import ...`
    if path not in sys.path:
        sys.path.insert(0, path)

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import tiny_model_args  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from fixtures.synthetic import make_demo_dataset, vocabulary  # noqa: E402
from fixtures.tiny_base import make_tiny_base  # noqa: E402
from fixtures.tiny_vlms import make_tiny_vlm  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Matrices as small as the tiny base's run ~50x slower on 2 OpenMP threads when the cores
    are shared (subprocess runs of train.py keep torch's default)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> dict:
    """{"vision": path, "llm": path}: tiny CLIP tower (48 px, patch 6) + tiny Llama, seed 0."""
    return make_tiny_base(str(tmp_path_factory.mktemp("tiny_base")), vocabulary(), seed=0)


@pytest.fixture(scope="session")
def tiny_base_siglip(tmp_path_factory) -> dict:
    """The same base with a SigLIP tower (no CLS token)."""
    return make_tiny_base(str(tmp_path_factory.mktemp("tiny_base_siglip")), vocabulary(), seed=0, vision="siglip")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict:
    """{"train": json, "eval": json, "image_folder": dir}: 64 + 16 synthetic shape records;
    image paths in the records are relative to image_folder (the folder of the json files)."""
    paths = make_demo_dataset(str(tmp_path_factory.mktemp("demo_data")), train_size=64, eval_size=16)
    return {**paths, "image_folder": os.path.dirname(paths["train"])}


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_base):
    """The tiny base's tokenizer. Shared: tests that change it must work on a copy."""
    return AutoTokenizer.from_pretrained(tiny_base["llm"])


@pytest.fixture
def model_args(tiny_base):
    """`model_args(**overrides)` -> ModelArguments on the tiny CLIP base (see helpers.tiny_model_args)."""
    return lambda **overrides: tiny_model_args(tiny_base, **overrides)


@pytest.fixture(scope="session")
def released_vlm(tmp_path_factory):
    """`released_vlm(family, seed=0)` -> folder of a tiny released VLM (fixtures/tiny_vlms.py: the
    family's config at toy size, seeded random weights, saved with save_pretrained), built once per
    (family, seed) in this session. Same seed, same weights; another seed, same config."""
    root = tmp_path_factory.mktemp("released_vlms")
    return lambda family, seed=0: make_tiny_vlm(family, str(root / f"{family}-{seed}"), seed=seed)


@pytest.fixture(scope="session")
def released_data(tmp_path_factory) -> dict:
    """{"train", "eval", "mixed": json, "image_folder": dir}: 8 + 2 synthetic shape records (1-2
    turns each), and `mixed`: one of those image records plus one text-only record."""
    root = tmp_path_factory.mktemp("released_data")
    paths = make_demo_dataset(str(root), train_size=8, eval_size=2)
    with open(paths["train"]) as f:
        with_image = json.load(f)[0]
    text_only = {
        "id": "text-only",
        "conversations": [{"from": "human", "value": "What is a square?"}, {"from": "gpt", "value": "square"}],
    }
    mixed = str(root / "mixed.json")
    with open(mixed, "w") as f:
        json.dump([with_image, text_only], f)
    return {**paths, "mixed": mixed, "image_folder": str(root)}


# --- the order the workers take the tests in (scripts/test.sh: pytest-xdist, --dist worksteal) -----
# Worksteal hands each worker a contiguous half of this order and lets an idle worker take the tail
# of the other's queue. So the long tests come first (the run ends on short tests on both cores, not
# on the demo alone on one): the demo, the longest single test (`--durations`), at once; then the
# vLLM tests, which wait for .venv-vllm's background install and by then find it built; then the
# other marked (slow) tests; the fast ones last.
HEAVY_MARKERS = ("slow", "distributed", "deepspeed", "browser")


def _start_rank(item) -> int:
    if os.path.basename(str(item.path)) == "test_demo.py":
        return 0
    if item.get_closest_marker("vllm"):
        return 1
    return 2 if any(item.get_closest_marker(name) for name in HEAVY_MARKERS) else 3


def pytest_collection_modifyitems(config, items):
    items.sort(key=_start_rank)  # stable: collection order within a rank
