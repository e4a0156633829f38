"""bench/training.py on the tiny shape: one row per side with every field present and sane, and the
ours/peer line. Speed is measured by hand (docs/benchmarks.md), never asserted here."""

from __future__ import annotations

import glob
import json
import math
import os
import re
import subprocess
import sys

import pytest

from bench import native_shapes, training
from bench import shapes as bench_shapes
from bench.arguments import BENCH_RECIPES

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = ["--shape", "tiny", "--recipe", "lora", "--warmup_steps", "1", "--steps", "2", "--repeats", "1"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
    """The tiny shape built here, in this process (transformers is loaded already), so the two
    runs below start no build process of their own."""
    path = str(tmp_path_factory.mktemp("bench"))
    name, shape = bench_shapes.load_shape("tiny")
    bench_shapes.build_base(bench_shapes.base_dir(name, shape, "float32", path), shape, "float32")
    return path


def run_bench(workdir: str, *extra: str, args: list[str] = ARGS) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-m", "bench.training", *args, "--workdir", workdir, *extra],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout.splitlines()


def rows(lines: list[str]) -> dict[str, dict[str, str]]:
    """side -> {column: value} of the table under the header."""
    names = training.HEADER.split()
    start = lines.index(training.HEADER) + 1
    table = {}
    for line in lines[start:]:
        words = line.split()
        if len(words) != len(names) or words[0] != "lora":
            break
        table[words[1]] = dict(zip(names, words, strict=True))
    return table


def ratio_of_rounded(ratio: float, numerator: float, denominator: float) -> bool:
    """Whether `ratio` (printed to 3 decimals) can be numerator / denominator, two columns printed
    to 0.1 MiB: a tiny shape's few MiB make that rounding larger than any fixed tolerance."""
    return (numerator - 0.05) / (denominator + 0.05) - 0.0005 <= ratio <= (numerator + 0.05) / (denominator - 0.05) + 0.0005


def check_row(row: dict[str, str], seq_len: int = 48) -> None:
    numbers = {k: float(v) for k, v in row.items() if k not in ("recipe", "side")}
    assert all(math.isfinite(v) and v > 0 for v in numbers.values()), numbers
    assert 0 < numbers["MFU"] <= 1
    # Throughput and FLOP/s are the step time seen three ways (the table rounds each).
    assert numbers["samples/s"] == pytest.approx(2 / numbers["step_s"], rel=0.03)
    assert numbers["tokens/s"] == pytest.approx(2 * seq_len / numbers["step_s"], rel=0.03)
    assert numbers["GFLOP/s"] == pytest.approx(numbers["GFLOP/step"] / numbers["step_s"], rel=0.05)
    assert ratio_of_rounded(numbers["peak/plan"], numbers["peak_MiB"], numbers["plan_MiB"])
    assert numbers["peak_MiB"] > numbers["step_MiB"]  # the weights and optimizer states are in it
    assert numbers["rss_MiB"] > numbers["peak_MiB"]  # the process holds its tensors, and libtorch


@pytest.mark.slow
def test_bench_prints_our_row(workdir):
    lines = run_bench(workdir)
    assert lines[0].startswith("bench: shape tiny, batch 2 x 48 tokens")
    table = rows(lines)
    assert list(table) == ["ours"]
    check_row(table["ours"])
    assert not any("ours/peer" in line for line in lines)


@pytest.mark.slow
def test_bench_peer_prints_both_rows_and_the_ratios(workdir):
    lines = run_bench(workdir, "--peer")
    table = rows(lines)
    assert list(table) == ["ours", "peer"]
    for row in table.values():
        check_row(row)
    # The same weights, batches and recipe on both sides: the same first loss.
    assert float(table["ours"]["loss0"]) == pytest.approx(float(table["peer"]["loss0"]), abs=1e-3)
    (ratio,) = [line for line in lines if "ours/peer" in line]
    match = re.fullmatch(r"lora ours/peer step-time (\S+) memory (\S+) rss (\S+)", ratio)
    assert match, ratio
    step_ratio, memory_ratio, rss_ratio = map(float, match.groups())
    assert step_ratio == pytest.approx(float(table["ours"]["step_s"]) / float(table["peer"]["step_s"]), rel=0.03)
    assert ratio_of_rounded(memory_ratio, float(table["ours"]["peak_MiB"]), float(table["peer"]["peak_MiB"]))
    assert rss_ratio == pytest.approx(float(table["ours"]["rss_MiB"]) / float(table["peer"]["rss_MiB"]), rel=0.01)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(bench_shapes.SHAPES, "*.yaml"))), ids=os.path.basename)
def test_every_shape_is_a_valid_vision_and_llm_config(path):
    """A shape's vision and llm sections are transformers configs (a typo in a key fails here,
    not an hour into a GPU run), with a batch that leaves text after the image tokens."""
    _, shape = bench_shapes.load_shape(path)
    for part in ("vision", "llm"):
        config = bench_shapes.shape_config(shape, part)
        default = type(config)()
        # A config keeps a key it does not know as a plain attribute; one it knows is either an
        # attribute of its own or consumed (transformers 5 moves rope_theta into rope_parameters).
        unknown = [key for key in shape[part] if not hasattr(default, key) and hasattr(config, key)]
        assert unknown == [], f"{part}: {unknown} are not {type(config).__name__} settings"
    assert shape["seq_len"] > bench_shapes.image_tokens_per_image(shape) + 2 and shape["batch_size"] >= 1


@pytest.mark.slow
def test_plan_only_plans_every_recipe_without_weights(tmp_path):
    """--plan_only builds each recipe on the meta device from the shape's configs: a GPU shape
    is planned on any machine, with nothing trained or downloaded."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.training", "--shape", "tiny", "--plan_only", "--workdir", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("plan: shape tiny, batch 2 x 48 tokens") and "62 labelled positions" in lines[0]
    table = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in lines[2:]}
    assert list(table) == list(BENCH_RECIPES)
    for recipe, (weights, grads, adamw, act_off, act_on, total_off, total_on) in table.items():
        assert weights > 0 and act_on <= act_off, recipe
        assert total_off == pytest.approx(weights + grads + adamw + act_off, abs=0.2), recipe
        assert total_on == pytest.approx(weights + grads + adamw + act_on, abs=0.2), recipe
    assert table["full"][1] > table["lora"][1] >= table["pretrain"][1]  # gradients of what trains only
    assert not glob.glob(os.path.join(tmp_path, "**", "*.safetensors"), recursive=True)  # no weights written


# --- a native shape: one released Qwen2.5-VL, ours through --vlm_model, the peer through TRL -----------

NATIVE = "tiny_qwen25vl"
NATIVE_ARGS = ["--shape", NATIVE, "--recipe", "lora", "--warmup_steps", "1", "--steps", "2", "--repeats", "1"]


@pytest.fixture(scope="module")
def native_workdir(tmp_path_factory) -> str:
    """The tiny native shape built here: one folder, model and processor, as a released VLM's."""
    path = str(tmp_path_factory.mktemp("bench_native"))
    name, shape = bench_shapes.load_shape(NATIVE)
    native_shapes.build_native(bench_shapes.base_dir(name, shape, "float32", path), shape, "float32")
    return path


def test_native_samples_label_the_answer_only(native_workdir):
    """The batches of a native shape come from the model's own processor and chat template: exactly
    `seq_len` tokens, each image expanded to its tokens (never labelled), labels from the answer on."""
    name, shape = bench_shapes.load_shape(NATIVE)
    base = bench_shapes.base_dir(name, shape, "float32", native_workdir)
    batch = native_shapes.native_samples(base, shape, n=2, seq_len=64, images=2, vocab=shape["llm"]["vocab_size"])
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == labels.shape == (2, 64) and bool(batch["attention_mask"].all())
    image_token = json.load(open(os.path.join(base, "config.json")))["image_token_id"]
    assert ((ids == image_token).sum(1) == 2 * bench_shapes.image_tokens_per_image(shape)).all()
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] * 4 and batch["pixel_values"].shape[0] == 4 * 16
    for row in range(2):
        labelled = (labels[row] != -100).nonzero().flatten()
        start = int(labelled[0])
        assert labelled.tolist() == list(range(start, 64))  # the answer, its end of turn, to the end
        assert (labels[row, start:] == ids[row, start:]).all() and not (ids[row, start:] == image_token).any()
        assert int((ids[row, :start] == image_token).sum()) == 8  # both images before the answer


@pytest.mark.slow
def test_native_shape_trains_the_same_model_on_both_sides(native_workdir):
    lines = run_bench(native_workdir, "--peer", args=NATIVE_ARGS)
    assert lines[0].startswith(f"bench: shape {NATIVE}, batch 2 x 64 tokens") and "the same qwen2_5_vl model" in lines[0]
    table = rows(lines)
    assert list(table) == ["ours", "peer"]
    for row in table.values():
        check_row(row, seq_len=64)  # the plan's columns too: the --dry_run plan covers a released VLM
    # One model, one set of weights and batches: the same loss before training and, trained by
    # the same optimizer on the same parameters, the same mean training loss.
    assert float(table["ours"]["loss0"]) == pytest.approx(float(table["peer"]["loss0"]), abs=1e-3)
    assert float(table["ours"]["loss"]) == pytest.approx(float(table["peer"]["loss"]), abs=1e-3)
    (ratio,) = [line for line in lines if "ours/peer" in line]
    match = re.fullmatch(r"lora ours/peer step-time (\S+) memory (\S+) rss (\S+)", ratio)
    assert match and all(float(v) > 0 for v in match.groups()), ratio


@pytest.mark.slow
def test_plan_only_plans_a_native_shape_from_its_config_alone(tmp_path):
    """A native shape's plan: the released model built on the meta device from one config.json,
    its image at the shape's size (the pixel budget), planned as train.py --dry_run plans it."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.training", "--shape", NATIVE, "--plan_only", "--workdir", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    _, shape = bench_shapes.load_shape(NATIVE)
    assert f"image(s) of {bench_shapes.image_tokens_per_image(shape)} tokens/sample" in lines[0]
    table = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in lines[2:]}
    assert list(table) == list(BENCH_RECIPES)
    assert table["full"][1] > table["lora"][1] >= table["pretrain"][1] > 0  # gradients of what trains only
    assert not glob.glob(os.path.join(tmp_path, "**", "*.safetensors"), recursive=True)
