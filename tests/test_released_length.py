"""A released VLM's sample is as long in the data check before step 1 as its processor makes it:
the processor's own count of tokens per image size (`data.processor_prompt.ImageTokenCount`),
so a record whose images make it too long is dropped and named before training rather than
stopping a batch mid-run. On the tiny models of fixtures/tiny_vlms.py, nothing downloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO_ROOT, SUBPROCESS_ENV
from PIL import Image

from config import ModelArguments
from constants import IGNORE_INDEX
from data.dataset import read_records
from data.media import image_size, load_image
from data.processor_prompt import ImageTokenCount, ProcessorDataset, ProcessorTemplate, encode_batch
from data.validate import validate_data_file
from model.released import load_released_processor
from patches import processor_image_tokens
from train import main as train_main

COUNTED = ["llava", "qwen2_5_vl", "paligemma"]  # processors that state their count in transformers 5.23
QUESTION = "<image>\nWhat is in the picture? Answer in a few words."
ANSWER = "a small purple square on a white ground"
# Qwen2.5-VL's image tokens depend on the image's size (its pixel budget, patch 8, merge 2 here).
QWEN_BUDGET = dict(min_pixels=16 * 16, max_pixels=96 * 96)


def processor_of(released_vlm, family: str):
    template = "configs/chat_templates/paligemma.jinja" if family == "paligemma" else None
    budget = QWEN_BUDGET if family == "qwen2_5_vl" else {}
    return load_released_processor(ModelArguments(vlm_model=released_vlm(family), **budget), template)


def conversation(image) -> tuple[list[dict], list]:
    return [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}], [image]


@pytest.mark.parametrize("family", COUNTED)
def test_the_count_by_size_is_the_processors_expansion(family, released_vlm):
    """The processor's own count (patches.processor_image_tokens, a private method of
    transformers 5.23's processors) is the number of image tokens it puts in a sample."""
    processor = processor_of(released_vlm, family)
    sizes = [(48, 48), (40, 64), (96, 32), (200, 120)]  # (height, width)
    counts = processor_image_tokens(processor, sizes)
    for (height, width), count in zip(sizes, counts, strict=True):
        batch = encode_batch(processor, [conversation(Image.new("RGB", (width, height)))])
        assert int((batch["input_ids"] == processor.image_token_id).sum()) == count
    if family == "qwen2_5_vl":
        assert len(set(counts)) > 1  # dynamic resolution: the size matters


@pytest.mark.parametrize("family", ["smolvlm", "minicpmv4_6"])
def test_a_processor_that_does_not_count_says_so(family, released_vlm):
    assert ImageTokenCount(processor_of(released_vlm, family))([(48, 48)]) is None


def test_tokens_a_processor_adds_to_a_sample_are_counted(released_vlm):
    """PaliGemma's processor puts a BOS after the image tokens and a newline after the prompt."""
    assert ImageTokenCount(processor_of(released_vlm, "paligemma")).per_sample == 2
    assert ImageTokenCount(processor_of(released_vlm, "llava")).per_sample == 0


def write_records(folder, sizes: list[tuple[int, int]]) -> str:
    """One record per image size (height, width), each with QUESTION and ANSWER."""
    os.makedirs(folder / "images", exist_ok=True)
    records = []
    for k, (height, width) in enumerate(sizes):
        Image.new("RGB", (width, height), (120, 30, 200)).save(folder / "images" / f"{k}.png")
        records.append({"id": f"r{k}", "image": f"images/{k}.png", "conversations": [
            {"from": "human", "value": QUESTION}, {"from": "gpt", "value": ANSWER}]})
    path = folder / "train.json"
    path.write_text(json.dumps(records))
    return str(path)


def answer_length(processor, size: tuple[int, int]) -> tuple[int, int]:
    """(tokens of the processor's sample, tokens of its answer and end of turn)."""
    batch = encode_batch(processor, [conversation(Image.new("RGB", size[::-1]))])
    return batch["input_ids"].shape[1], int((batch["labels"] != IGNORE_INDEX).sum())


@pytest.mark.parametrize("family", COUNTED)
def test_check_drops_exactly_the_records_the_processor_makes_too_long(family, released_vlm, tmp_path):
    """A sample may be cut while an answer token survives; one token shorter, it is dropped. The
    check puts that boundary where the processor does, for each image's size."""
    processor = processor_of(released_vlm, family)
    small, large = (32, 32), (96, 96)
    length, answer = answer_length(processor, large)
    path = write_records(tmp_path, [small, large])

    def too_long(max_length: int, counted: bool = True) -> list[str]:
        report = validate_data_file(
            path, ProcessorTemplate(processor), 1, processor.image_token_id, max_length, str(tmp_path),
            image_tokens=ImageTokenCount(processor) if counted else None,
        )
        assert not report.of("fatal", "error"), report.refusal()
        return [p.record_id for p in report.problems if p.kind == "too_long"]

    assert too_long(length - answer + 1) == []  # one answer token survives the cut: trained, cut
    if family == "qwen2_5_vl":  # the small image is fewer tokens: only the large one is dropped
        assert too_long(length - answer) == ["r1"]
        assert too_long(length - answer, counted=False) == []  # an image as one token: it would pass
    else:  # one count for every image
        assert too_long(length - answer) == ["r0", "r1"]


def test_train_py_drops_a_record_its_image_makes_too_long_and_trains(released_vlm, tmp_path):
    """The record is named in skipped_records.jsonl before step 1 and the run finishes: it never
    reaches a batch (which would stop training, naming it)."""
    processor = processor_of(released_vlm, "qwen2_5_vl")
    length, answer = answer_length(processor, (96, 96))
    path = write_records(tmp_path, [(32, 32), (32, 32), (96, 96), (32, 32)])
    out = tmp_path / "run"
    train_main([
        "--vlm_model", released_vlm("qwen2_5_vl"), "--data_path", path, "--image_folder", str(tmp_path),
        "--min_pixels", str(QWEN_BUDGET["min_pixels"]), "--max_pixels", str(QWEN_BUDGET["max_pixels"]),
        "--max_length", str(length - answer), "--output_dir", str(out), "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--report_to", "none", "--disable_tqdm", "true",
        "--data_check_cache", str(tmp_path / "cache"), "--save_strategy", "no",
    ])
    skipped = [json.loads(line) for line in (out / "skipped_records.jsonl").read_text().splitlines()]
    assert [row["id"] for row in skipped] == ["r2"] and "too_long" in skipped[0]["reasons"][0]
    assert (out / "delta.safetensors").is_file()


@pytest.mark.slow
def test_check_data_script_counts_a_released_vlms_images(released_vlm, tmp_path):
    """scripts/check_data.py reads records as train.py does, a released VLM's images included."""
    processor = processor_of(released_vlm, "qwen2_5_vl")
    length, answer = answer_length(processor, (96, 96))
    path = write_records(tmp_path, [(32, 32), (96, 96)])
    result = subprocess.run(
        [sys.executable, "-m", "scripts.check_data", "--vlm_model", released_vlm("qwen2_5_vl"), "--data_path", path,
         "--image_folder", str(tmp_path), "--max_length", str(length - answer),
         "--min_pixels", str(QWEN_BUDGET["min_pixels"]), "--max_pixels", str(QWEN_BUDGET["max_pixels"])],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=SUBPROCESS_ENV,
    )
    assert result.returncode == 0, result.stderr[-2000:]  # too long is dropped, not refused
    dropped = [line for line in result.stdout.splitlines() if line.startswith("dropped: too_long")]
    assert len(dropped) == 1 and "r1" in dropped[0], result.stdout


def test_length_grouping_counts_a_released_samples_image_tokens(released_vlm, tmp_path):
    """Qwen2.5-VL's 96 x 96 image is more tokens than a long answer: the length-grouped sampler
    (its longest sample first) orders samples as the processor will make them, not by their text."""
    processor = processor_of(released_vlm, "qwen2_5_vl")
    path = write_records(tmp_path, [(32, 32), (96, 96)])
    records = read_records(path)
    records[0]["conversations"][1]["value"] = ANSWER + ", truly"  # the longer text, with the smaller image
    dataset = ProcessorDataset(records, str(tmp_path), processor)
    made = [encode_batch(processor, [(sample["messages"], sample["images"])])["input_ids"].shape[1]
            for sample in (dataset[0], dataset[1])]
    characters = [sum(len(turn["value"]) for turn in r["conversations"]) for r in records]
    lengths = dataset.lengths()
    assert made[1] > made[0] and characters[1] < characters[0]
    assert lengths[1] > lengths[0]


def test_image_size_is_the_loaded_images_after_exif_rotation(tmp_path):
    image = Image.new("RGB", (60, 20))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    loaded = load_image(str(tmp_path / "rotated.jpg"))
    assert image_size(str(tmp_path / "rotated.jpg")) == (loaded.height, loaded.width) == (60, 20)
