"""Data that real users bring: every bad-input kind reported with its record (or skipped and
counted under --skip_bad_samples), images of any mode loaded as the right RGB pixels, no
silent zero loss, and a property test of the label mask over random conversations."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import transformers.video_utils
from helpers import save_video, tiny_model_args
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer

import data.validate as validate
import infer
import train
from config import DataArguments
from data.dataset import Collator, SupervisedDataset, read_records
from data.media import ImageError, load_image, load_video_frames, video_frame_paths, video_length
from data.prompt import (
    IGNORE_INDEX,
    IMAGE_MARKER,
    TemplateMismatch,
    llava_to_messages,
    tokenize_conversation,
    tokenize_prompt,
)
from data.records import DataError
from data.validate import check_conversation, check_training_data, validate_cached, validate_data_file
from run.checkpoint import load_checkpoint
from run.predict import first_question, generate_answers, predict_records
from scripts import check_data

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_TOKEN = -200
N_IMAGE = 4  # image tokens per image here; any count works


# --- helpers -------------------------------------------------------------------------------------


def save_image(path, mode="RGB", size=(8, 8), color=(200, 30, 30)) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def record(record_id, image="a.png", question="What color are the shapes?", answer="red", **extra) -> dict:
    conversations = [{"from": "human", "value": (IMAGE_MARKER + "\n" if image else "") + question},
                     {"from": "gpt", "value": answer}]
    out = {"id": record_id, "conversations": conversations, **extra}
    if image:
        out["image"] = image
    return out


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
    return str(path)


@pytest.fixture
def folder(tmp_path):
    """An image folder with one good image, a.png."""
    save_image(str(tmp_path / "images" / "a.png"))
    return str(tmp_path / "images")


@pytest.fixture
def check(tiny_tokenizer):
    def run(data_path, image_folder, max_length=256, tokenizer=None):
        return validate_data_file(
            str(data_path), tokenizer or tiny_tokenizer, N_IMAGE, IMAGE_TOKEN, max_length, image_folder
        )

    return run


@pytest.fixture(scope="module")
def image_processor(tiny_base):
    return AutoImageProcessor.from_pretrained(tiny_base["vision"])


def only_problem(report, kind):
    """The report's single problem, which must be of `kind`."""
    assert [p.kind for p in report.problems] == [kind], [str(p) for p in report.problems]
    return report.problems[0]


def bad_file_with(tmp_path, folder, bad_row) -> str:
    """Two good records around one bad one (line 2, id "bad")."""
    return write_jsonl(tmp_path / "data.jsonl", [record("good-1"), bad_row, record("good-2")])


# --- a good file ---------------------------------------------------------------------------------


def test_demo_data_has_no_problems(check, demo_data):
    report = check(demo_data["train"], demo_data["image_folder"])
    assert report.num_records == 64
    assert report.problems == []
    assert not report.refuses_training


def test_text_only_records_are_legal(check, tmp_path, folder):
    path = write_jsonl(tmp_path / "d.jsonl", [record("t", image=None), record("i")])
    assert check(path, folder).problems == []


# --- each bad-input kind -------------------------------------------------------------------------


def test_missing_image(check, tmp_path, folder):
    path = bad_file_with(tmp_path, folder, record("bad", image="nope.png"))
    problem = only_problem(check(path, folder), "missing_image")
    assert (problem.location, problem.record_id) == ("line 2", "bad")
    assert "nope.png" in problem.reason and "missing" in problem.reason


def test_corrupt_image(check, tmp_path, folder):
    with open(os.path.join(folder, "junk.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    path = bad_file_with(tmp_path, folder, record("bad", image="junk.png"))
    problem = only_problem(check(path, folder), "corrupt_image")
    assert problem.record_id == "bad" and "junk.png" in problem.reason


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(check, tmp_path, folder, fmt):
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, fmt)
    with open(os.path.join(folder, "cut.img"), "wb") as f:
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    path = bad_file_with(tmp_path, folder, record("bad", image="cut.img"))
    problem = only_problem(check(path, folder), "corrupt_image")
    assert "truncated" in problem.reason and problem.location == "line 2"


def test_zero_byte_image(check, tmp_path, folder):
    open(os.path.join(folder, "empty.png"), "wb").close()
    path = bad_file_with(tmp_path, folder, record("bad", image="empty.png"))
    problem = only_problem(check(path, folder), "empty_image")
    assert "zero-byte" in problem.reason and problem.record_id == "bad"


@pytest.mark.parametrize("limit", [1500, 1000], ids=["over-the-limit", "over-twice-the-limit"])
def test_huge_image_is_refused_with_the_limit_named(check, tmp_path, folder, monkeypatch, limit):
    # 48 x 48 = 2304 pixels: above the limit (PIL only warns) and above twice it (PIL raises).
    save_image(os.path.join(folder, "big.png"), size=(48, 48))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    path = bad_file_with(tmp_path, folder, record("bad", image="big.png"))
    problem = only_problem(check(path, folder), "huge_image")
    assert "too large" in problem.reason and "MAX_IMAGE_PIXELS" in problem.reason
    with pytest.raises(ImageError, match="decompression-bomb limit"):
        load_image(os.path.join(folder, "big.png"))


@pytest.mark.parametrize(
    "question, images",
    [
        ("<image>\n<image>\nWhat color?", "a.png"),  # two markers, one image
        ("<image>\nWhat color?", ["a.png", "a.png"]),  # one marker, two images
        ("<image>\nWhat color?", None),  # a marker, no image
    ],
)
def test_image_marker_count_must_match_the_images(check, tmp_path, folder, question, images):
    row = record("bad", image=None, question=question)
    if images:
        row["image"] = images
    path = bad_file_with(tmp_path, folder, row)
    problem = only_problem(check(path, folder), "image_marker")
    assert "markers for" in problem.reason and problem.record_id == "bad"


def test_image_without_marker_gets_one_before_the_first_question(check, tmp_path, folder, tiny_tokenizer):
    row = record("r", image="a.png", question="What color are the shapes?")
    row["conversations"][0]["value"] = "What color are the shapes?"  # no marker
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    assert check(path, folder).problems == []  # the documented rule, not an error

    expected = llava_to_messages(row["conversations"], 1)
    assert expected[0]["content"] == "<image>\nWhat color are the shapes?"
    # Training and inference read the record the same way: the prompt is the training prefix.
    dataset = SupervisedDataset(path, folder, tiny_tokenizer, N_IMAGE, IMAGE_TOKEN, 256)
    ids = dataset[0]["input_ids"].tolist()
    assert ids.count(IMAGE_TOKEN) == N_IMAGE
    messages, images, answer = first_question(read_records(path)[0], folder)
    prompt = tokenize_prompt(tiny_tokenizer, messages, N_IMAGE, IMAGE_TOKEN)
    assert ids[: len(prompt)] == prompt and len(images) == 1 and answer == "red"


@pytest.mark.parametrize("answer", ["", "   \n\t"], ids=["empty", "whitespace"])
def test_empty_assistant_turn(check, tmp_path, folder, answer):
    path = bad_file_with(tmp_path, folder, record("bad", answer=answer))
    problem = only_problem(check(path, folder), "empty_answer")
    assert "turn 1" in problem.reason and problem.record_id == "bad"


@pytest.mark.parametrize(
    "turns, named",
    [
        ([("human", "<image>\nq"), ("bot", "a")], "unknown role 'bot'"),
        ([("human", "<image>\nq"), ("human", "q"), ("gpt", "a")], "turn 1 is 'human'"),
        ([("gpt", "a"), ("human", "<image>\nq"), ("gpt", "a")], "turn 0 is 'gpt'"),
        ([("human", "<image>\nq"), ("gpt", "a"), ("system", "s"), ("gpt", "a")], "turn 2 is 'system'"),
    ],
    ids=["unknown", "human-human", "starts-with-gpt", "system-in-the-middle"],
)
def test_unknown_or_non_alternating_roles(check, tmp_path, folder, turns, named):
    row = {"id": "bad", "image": "a.png", "conversations": [{"from": f, "value": v} for f, v in turns]}
    path = bad_file_with(tmp_path, folder, row)
    problem = only_problem(check(path, folder), "roles")
    assert named in problem.reason and problem.location == "line 2"


def test_conversation_ending_on_a_human_turn(check, tmp_path, folder):
    row = record("bad")
    row["conversations"].append({"from": "human", "value": "And the shape?"})
    path = bad_file_with(tmp_path, folder, row)
    problem = only_problem(check(path, folder), "ends_on_human")
    assert problem.record_id == "bad" and "ends without an answer" in problem.reason


def test_too_long_is_dropped_and_counted_never_cut_through_an_image(check, tmp_path, folder, tiny_tokenizer):
    # The image comes after a long first exchange: it fits no max_length that keeps the rest.
    long = {"id": "long", "image": "a.png", "conversations": [
        {"from": "human", "value": "What shape is shown? " * 20}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "<image>\nWhat color are the shapes?"}, {"from": "gpt", "value": "red"},
    ]}
    path = write_jsonl(tmp_path / "d.jsonl", [record("ok-1"), long, record("ok-2")])
    max_length = 40
    report = check(path, folder, max_length=max_length)
    problem = only_problem(report, "too_long")
    assert problem.record_id == "long" and problem.severity == "dropped"
    assert not report.refuses_training  # dropped and counted, as LLaVA users expect
    assert "1 too long" in report.summary()

    dataset = SupervisedDataset(path, folder, tiny_tokenizer, N_IMAGE, IMAGE_TOKEN, max_length)
    assert (len(dataset), dataset.num_dropped) == (2, 1)
    for i in range(len(dataset)):
        example = dataset[i]
        assert example["input_ids"].tolist().count(IMAGE_TOKEN) == N_IMAGE * len(example["images"])
        assert (example["labels"] != IGNORE_INDEX).any()  # never an all-masked sample


def test_malformed_json_line_names_its_line(check, tmp_path, folder):
    path = write_jsonl(tmp_path / "d.jsonl", [record("a"), "", '{"id": "b", "conversations": [', record("c")])
    report = check(path, folder)
    problem = only_problem(report, "malformed_json")
    assert problem.location == "line 3"  # blank lines count as lines, not as records
    assert report.num_records == 3


def test_malformed_json_file_names_the_line_and_is_fatal(check, tmp_path, folder):
    text = json.dumps([record("a"), record("b")], indent=1)
    path = tmp_path / "d.json"
    path.write_text(text.replace('"b"', '"b",,', 1))
    problem = only_problem(check(path, folder), "unreadable_file")
    line = text[: text.index('"b"')].count("\n") + 1
    assert f"line {line}" in problem.reason and problem.severity == "fatal"


def test_non_utf8_text(check, tmp_path, folder):
    path = tmp_path / "d.jsonl"
    bad = json.dumps(record("bad", answer="caf\u00e9"), ensure_ascii=False).encode("latin-1")  # not UTF-8
    path.write_bytes(b"\n".join([json.dumps(record("a")).encode(), bad, json.dumps(record("c")).encode()]))
    problem = only_problem(check(path, folder), "non_utf8")
    assert (problem.location, problem.record_id) == ("line 2", "bad") and "UTF-8" in problem.reason


@pytest.mark.parametrize("name", ["../secret.png", "sub/../../secret.png", "ABSOLUTE"])
def test_image_path_escaping_the_folder_is_refused(check, tmp_path, folder, name):
    secret = save_image(str(tmp_path / "secret.png"))  # exists: refused for where it is, not for missing
    name = secret if name == "ABSOLUTE" else name
    path = bad_file_with(tmp_path, folder, record("bad", image=name))
    problem = only_problem(check(path, folder), "image_path")
    assert "escapes --image_folder" in problem.reason and problem.record_id == "bad"


def test_duplicate_ids_are_warned_not_fatal(check, tmp_path, folder):
    path = write_jsonl(tmp_path / "d.jsonl", [record("same"), record("other"), record("same")])
    report = check(path, folder)
    problem = only_problem(report, "duplicate_id")
    assert problem.location == "line 3" and "first at line 1" in problem.reason
    assert problem.severity == "warning" and not report.refuses_training


def test_numeric_ids_and_mixed_image_fields_read_as_one_shape(tmp_path, folder, tiny_tokenizer):
    # `datasets`' JSON reader fails on int/str ids or str/list images mixed in one file.
    rows = [record(7), record("x", image=["a.png"]), record(8, image=None)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert [r["id"] for r in read_records(path)] == ["7", "x", "8"]
    dataset = SupervisedDataset(path, folder, tiny_tokenizer, N_IMAGE, IMAGE_TOKEN, 256)
    assert [len(dataset[i]["images"]) for i in range(3)] == [1, 1, 0]
    assert dataset.multimodal() == [True, True, False]  # what modality-grouped sampling reads


# --- images of every mode, upright ---------------------------------------------------------------


def pixel(image, xy=(0, 0)):
    return image.getpixel(xy)


def test_rgba_is_composited_on_white(tmp_path):
    image = Image.new("RGBA", (2, 1))
    image.putpixel((0, 0), (255, 0, 0, 128))  # half-transparent red
    image.putpixel((1, 0), (0, 0, 0, 0))  # fully transparent, stored black
    image.save(tmp_path / "x.png")
    loaded = load_image(str(tmp_path / "x.png"))
    assert loaded.mode == "RGB"
    assert pixel(loaded, (0, 0)) == pytest.approx((255, 127, 127), abs=1)
    assert pixel(loaded, (1, 0)) == (255, 255, 255)  # not the black it stores


def test_la_is_composited_on_white(tmp_path):
    image = Image.new("LA", (1, 1), (0, 0))  # transparent black
    image.save(tmp_path / "x.png")
    assert pixel(load_image(str(tmp_path / "x.png"))) == (255, 255, 255)


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    image.save(tmp_path / "x.png", transparency=0)
    loaded = load_image(str(tmp_path / "x.png"))
    assert [pixel(loaded, (0, 0)), pixel(loaded, (1, 0))] == [(255, 255, 255), (10, 200, 30)]


def test_rgb_with_a_transparent_colour_is_composited_on_white(tmp_path):
    """An RGB PNG with a tRNS colour: not the plain-RGB fast path of load_image."""
    image = Image.new("RGB", (2, 1), (0, 0, 0))
    image.putpixel((1, 0), (10, 200, 30))
    image.save(tmp_path / "x.png", transparency=(0, 0, 0))
    loaded = load_image(str(tmp_path / "x.png"))
    assert [pixel(loaded, (0, 0)), pixel(loaded, (1, 0))] == [(255, 255, 255), (10, 200, 30)]
    Image.new("RGB", (2, 1), (0, 0, 0)).save(tmp_path / "plain.png")
    plain = load_image(str(tmp_path / "plain.png"))
    assert plain.mode == "RGB" and pixel(plain, (1, 0)) == (0, 0, 0)  # usable after its file closed


def test_grey_and_cmyk(tmp_path):
    Image.new("L", (1, 1), 77).save(tmp_path / "l.png")
    Image.new("CMYK", (1, 1), (255, 0, 0, 0)).save(tmp_path / "c.jpg", quality=100)  # pure cyan
    assert pixel(load_image(str(tmp_path / "l.png"))) == (77, 77, 77)
    r, g, b = pixel(load_image(str(tmp_path / "c.jpg")))
    assert r < 10 and g > 245 and b > 245


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "x.png")
    assert Image.open(tmp_path / "x.png").mode == "I;16"
    loaded = load_image(str(tmp_path / "x.png"))
    # PIL's own convert("RGB") would give 255 for all but the first.
    assert [pixel(loaded, (x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (2, 1))
    image.putpixel((0, 0), (255, 0, 0))
    image.putpixel((1, 0), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "x.png", exif=exif)
    loaded = load_image(str(tmp_path / "x.png"))
    assert loaded.size == (1, 2)
    assert pixel(loaded, (0, 0)) == (255, 0, 0) and pixel(loaded, (0, 1)) == (0, 0, 255)


def test_every_mode_passes_validation(check, tmp_path, folder):
    names = {"rgba.png": ("RGBA", (1, 2, 3, 4)), "la.png": ("LA", (5, 6)), "p.png": ("P", 3),
             "l.png": ("L", 9), "cmyk.jpg": ("CMYK", (1, 2, 3, 4)), "i16.png": ("I;16", 4000)}
    for name, (mode, color) in names.items():
        save_image(os.path.join(folder, name), mode, color=color)
    path = write_jsonl(tmp_path / "d.jsonl", [record(n, image=n) for n in names])
    assert check(path, folder).problems == []


# --- what train.py does with a report ------------------------------------------------------------


def data_args(path, folder, tmp_path, **overrides) -> DataArguments:
    return DataArguments(data_path=path, image_folder=folder, max_length=256,
                         data_check_cache=str(tmp_path / "cache"), **overrides)


def test_training_refuses_bad_data_naming_records_and_the_fix(tmp_path, folder, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [record("a"), record("bad", image="nope.png"), record("c")])
    with pytest.raises(DataError) as error:
        check_training_data(data_args(path, folder, tmp_path), tiny_tokenizer, N_IMAGE, IMAGE_TOKEN, str(tmp_path))
    message = str(error.value)
    assert "line 2 (id bad)" in message and "nope.png" in message
    assert "--skip_bad_samples true" in message and "check_data.py" in message
    assert not os.path.exists(tmp_path / "skipped_records.jsonl")


def test_skip_bad_samples_trains_on_the_rest_and_lists_the_skipped(
    tmp_path, folder, tiny_tokenizer, image_processor
):
    rows = [record("a"), record("bad-image", image="nope.png"), "{broken", record("d"), record("empty", answer=" ")]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    args = data_args(path, folder, tmp_path, skip_bad_samples=True)
    skip = check_training_data(args, tiny_tokenizer, N_IMAGE, IMAGE_TOKEN, str(out))
    assert skip == {1, 2, 4}
    with open(out / "skipped_records.jsonl") as f:
        skipped = [json.loads(line) for line in f]
    assert [(s["location"], s["id"]) for s in skipped] == [("line 2", "bad-image"), ("line 3", None), ("line 5", "empty")]
    assert "missing_image" in skipped[0]["reasons"][0] and "malformed_json" in skipped[1]["reasons"][0]

    dataset = SupervisedDataset(path, folder, tiny_tokenizer, N_IMAGE, IMAGE_TOKEN, 256, skip=skip)
    assert len(dataset) == 2
    batch = Collator(tiny_tokenizer.pad_token_id, image_processor)([dataset[0], dataset[1]])  # every image loads
    assert batch["pixel_values"].shape[0] == 2


def test_the_check_is_cached_by_file_hash(tmp_path, folder, tiny_tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [record("a"), record("b", image="nope.png")])
    args = (tiny_tokenizer, N_IMAGE, IMAGE_TOKEN, 256, folder, str(tmp_path / "cache"))
    first = validate_cached(path, *args)
    calls = []
    real = validate.validate_data_file
    monkeypatch.setattr(validate, "validate_data_file", lambda *a, **k: calls.append(a) or real(*a, **k))
    again = validate_cached(path, *args)
    assert calls == [] and again == first  # read back, not checked again
    validate_cached(path, *args[:3], 128, *args[4:])  # another max_length: checked again
    write_jsonl(path, [record("a")])  # another file content: checked again
    assert validate_cached(path, *args).problems == []
    assert len(calls) == 2


@pytest.mark.slow
def test_check_data_script_lists_every_problem_and_exits_1(tmp_path, folder, tiny_base):
    path = write_jsonl(tmp_path / "d.jsonl", [record("a"), record("bad", image="nope.png"), "{oops"])
    result = subprocess.run(
        [sys.executable, "-m", "scripts.check_data", "--data_path", path, "--image_folder", folder,
         "--llm_model", tiny_base["llm"], "--vision_model", tiny_base["vision"], "--max_length", "256"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "line 2 (id bad): missing image file" in result.stdout
    assert "line 3: malformed JSON" in result.stdout
    assert "3 records, 2 bad" in result.stdout


def test_check_data_script_passes_good_data(demo_data, tiny_base, capsys):
    code = check_data.main([
        "--data_path", demo_data["train"], "--image_folder", demo_data["image_folder"],
        "--llm_model", tiny_base["llm"], "--vision_model", tiny_base["vision"], "--max_length", "256",
    ])
    assert code == 0
    assert "64 records, 0 bad" in capsys.readouterr().out
    assert check_data.num_image_tokens(tiny_model_args_for(tiny_base)) == 64  # 8 x 8 patches, CLS dropped


def tiny_model_args_for(tiny_base):
    return tiny_model_args(tiny_base)


# --- no silent zero loss -------------------------------------------------------------------------

# Prefix-stable, but renders no assistant text at all: every label would be masked.
SILENT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] != 'assistant' %}"
    "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture
def silent_tokenizer(tiny_base):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base["llm"])  # a copy: the shared one stays intact
    tokenizer.chat_template = SILENT_TEMPLATE
    return tokenizer


def test_mostly_masked_data_is_a_template_error(tmp_path, folder, silent_tokenizer, check):
    path = write_jsonl(tmp_path / "d.jsonl", [record(str(i)) for i in range(4)])
    with pytest.raises(TemplateMismatch, match="chat template"):
        SupervisedDataset(path, folder, silent_tokenizer, N_IMAGE, IMAGE_TOKEN, 256)
    report = check(path, folder, tokenizer=silent_tokenizer)
    fatal = report.of("fatal")
    assert len(fatal) == 1 and "4 of 4 samples have no supervised token" in fatal[0].reason
    # Not something --skip_bad_samples can train around.
    args = data_args(path, folder, tmp_path, skip_bad_samples=True)
    with pytest.raises(DataError, match="chat template"):
        check_training_data(args, silent_tokenizer, N_IMAGE, IMAGE_TOKEN, None)


def test_a_few_fully_masked_samples_are_named_and_dropped(tmp_path, folder, tiny_base, check):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base["llm"])
    # Renders every answer except "blue": a sample answering only "blue" has nothing to learn.
    tokenizer.chat_template = SILENT_TEMPLATE.replace("m['role'] != 'assistant'", "m['content'] != 'blue'")
    rows = [record("a"), record("b"), record("only-blue", answer="blue")]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    problem = only_problem(check(path, folder, tokenizer=tokenizer), "no_labels")
    assert problem.record_id == "only-blue"
    dataset = SupervisedDataset(path, folder, tokenizer, N_IMAGE, IMAGE_TOKEN, 256)
    assert (len(dataset), dataset.num_dropped) == (2, 1)


# --- the label mask over random conversations ----------------------------------------------------

TEXT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789.,?!'-:\n", min_size=1, max_size=24)
ANSWER = TEXT.filter(lambda s: s.strip())


@st.composite
def conversations(draw):
    num_exchanges = draw(st.integers(1, 6))
    questions = [draw(TEXT) for _ in range(num_exchanges)]
    answers = [draw(ANSWER) for _ in range(num_exchanges)]
    num_images = draw(st.integers(0, 3))
    explicit_markers = draw(st.booleans())
    if explicit_markers:  # each marker in a random user turn, at its start
        for _ in range(num_images):
            k = draw(st.integers(0, num_exchanges - 1))
            questions[k] = IMAGE_MARKER + "\n" + questions[k]
    turns = []
    if draw(st.booleans()):
        turns.append({"from": "system", "value": draw(TEXT)})
    for q, a in zip(questions, answers, strict=True):
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return turns, num_images, answers


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sample=conversations())
def test_exactly_the_answers_learn(tiny_tokenizer, sample):
    turns, num_images, answers = sample
    assert check_conversation_ok(turns, num_images)
    messages = llava_to_messages(turns, num_images)
    ids, labels = tokenize_conversation(tiny_tokenizer, messages, N_IMAGE, IMAGE_TOKEN)

    assert len(ids) == len(labels)
    assert ids.count(IMAGE_TOKEN) == N_IMAGE * num_images
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels, strict=True))
    assert IMAGE_TOKEN not in [label for label in labels if label != IGNORE_INDEX]
    # One supervised run per answer, which decodes to that answer and its end of turn.
    runs, current = [], []
    for label in [*labels, IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    end = tiny_tokenizer.eos_token + "\n"  # ChatML: <|im_end|> and the newline after it
    assert [tiny_tokenizer.decode(run) for run in runs] == [answer + end for answer in answers]
    # And nothing else is hidden: the whole sequence is the template's rendering.
    text = tiny_tokenizer.decode([t for t in ids if t != IMAGE_TOKEN])
    rendered = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == rendered.replace(IMAGE_MARKER, "")


def check_conversation_ok(turns, num_images) -> bool:
    return check_conversation(turns, num_images) == []


# --- video as frames ----------------------------------------------------------------------------


def save_frames(folder, count, name="frame_{}.png") -> list[tuple]:
    """`count` frames, frame i coloured (10 * i, 0, 0) so a loaded frame says which it is."""
    colours = [(10 * i, 0, 0) for i in range(count)]
    for i, colour in enumerate(colours):
        save_image(os.path.join(folder, name.format(i)), color=colour)
    return colours


def test_video_frames_are_sampled_uniformly_in_time_order(tmp_path):
    save_frames(str(tmp_path / "clip"), 10)
    frames = video_frame_paths(str(tmp_path / "clip"), 4)
    # Middles of 4 equal segments of 10 frames; frame_10-style names sort naturally, not as text.
    assert [os.path.basename(f) for f in frames] == ["frame_1.png", "frame_3.png", "frame_6.png", "frame_8.png"]
    assert len(video_frame_paths(str(tmp_path / "clip"), 50)) == 10  # fewer frames: all of them


def test_video_record_expands_to_one_image_block_per_frame(tmp_path, tiny_tokenizer, image_processor):
    save_frames(str(tmp_path / "media" / "clip"), 5)
    row = {"id": "v", "video": "clip", "conversations": [
        {"from": "human", "value": "What color are the shapes?"}, {"from": "gpt", "value": "red"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    dataset = SupervisedDataset(path, str(tmp_path / "media"), tiny_tokenizer, N_IMAGE,
                                IMAGE_TOKEN, 256, num_frames=3)
    example = dataset[0]
    assert len(example["images"]) == 3
    assert Collator(tiny_tokenizer.pad_token_id, image_processor)([example])["pixel_values"].shape[0] == 3
    assert example["input_ids"].tolist().count(IMAGE_TOKEN) == 3 * N_IMAGE
    messages, images, _ = first_question(read_records(path)[0], str(tmp_path / "media"), num_frames=3)
    assert messages[0]["content"] == "<image><image><image>\nWhat color are the shapes?"
    assert [pixel(image) for image in images] == [(0, 0, 0), (20, 0, 0), (40, 0, 0)]  # frames 0, 2, 4 of 5


@pytest.mark.parametrize(
    "row, kind, named",
    [
        ({"video": "nowhere"}, "bad_video", "not a folder of frame images"),
        ({"video": "clip", "question": "<image>\nq"}, "image_marker", "a video record takes one <video>"),
        ({"video": "../clip"}, "image_path", "escapes --image_folder"),
        ({"video": "clip", "image": "a.png"}, "bad_record", "in a record without 'image'"),
        ({"question": "<video>\nq"}, "image_marker", "<video> marker in a record without a 'video'"),
    ],
    ids=["missing", "image-marker", "escapes", "with-image", "stray-video-marker"],
)
def test_bad_video_records(check, tmp_path, folder, row, kind, named):
    save_frames(os.path.join(folder, "clip"), 2)
    save_frames(str(tmp_path / "clip"), 2)
    question = row.pop("question", "What color are the shapes?")
    bad = {"id": "bad", **row, "conversations": [
        {"from": "human", "value": question}, {"from": "gpt", "value": "red"}]}
    path = bad_file_with(tmp_path, folder, bad)
    problem = only_problem(check(path, folder), kind)
    assert named in problem.reason and problem.record_id == "bad"


def test_a_corrupt_frame_names_the_video_record(check, tmp_path, folder):
    save_frames(os.path.join(folder, "clip"), 3)
    with open(os.path.join(folder, "clip", "frame_1.png"), "wb") as f:
        f.write(b"garbage")
    row = {"id": "bad", "video": "clip", "conversations": [
        {"from": "human", "value": "<video>\nWhat color?"}, {"from": "gpt", "value": "red"}]}
    problem = only_problem(check(bad_file_with(tmp_path, folder, row), folder), "corrupt_image")
    assert "frame_1.png" in problem.reason and problem.record_id == "bad"


# --- video files (mp4), decoded by transformers' load_video (PyAV) --------------------------------


def frame_number(image) -> int:
    red, green, blue = pixel(image, (image.width // 2, image.height // 2))
    assert green < 10 and blue < 10
    return round(red / 40)


def test_video_file_frames_are_sampled_uniformly(tmp_path):
    clip = save_video(str(tmp_path / "clip.mp4"), 6)
    assert video_length(clip, 3) == 3 and video_length(clip, 50) == 6  # read from the header
    # Middles of 3 equal segments of 6 frames, as for a folder of frames.
    assert [frame_number(f) for f in load_video_frames(clip, 3)] == [1, 3, 5]
    assert [frame_number(f) for f in load_video_frames(clip, 50)] == [0, 1, 2, 3, 4, 5]
    assert all(f.mode == "RGB" and f.size == (48, 48) for f in load_video_frames(clip, 2))


def damage(path, how: str) -> None:
    data = open(path, "rb").read() if os.path.exists(path) else b""
    if how == "missing":
        os.remove(path)
        return
    with open(path, "wb") as f:
        f.write({"garbage": b"not a video " * 50, "empty": b"", "truncated": data[: len(data) // 3]}[how])


@pytest.mark.parametrize(
    "how, named",
    [
        ("missing", "no such file"),
        ("empty", "zero-byte file"),
        ("garbage", "unreadable"),
        ("truncated", "clip.mp4"),
    ],
)
def test_bad_video_files_name_the_record(check, tmp_path, folder, how, named):
    damage(save_video(os.path.join(folder, "clip.mp4"), 4), how)
    row = {
        "id": "bad",
        "video": "clip.mp4",
        "conversations": [
            {"from": "human", "value": "<video>\nWhat color?"},
            {"from": "gpt", "value": "red"},
        ],
    }
    problem = only_problem(check(bad_file_with(tmp_path, folder, row), folder), "bad_video")
    assert named in problem.reason and "clip.mp4" in problem.reason and problem.record_id == "bad"


def test_a_video_file_that_decodes_short_is_refused(tmp_path, monkeypatch):
    """A file whose header declares more frames than decode (cut mid-stream): the prompt would
    hold more <image> blocks than frames, so it is an error, never a crash mid-training."""
    clip = save_video(str(tmp_path / "clip.mp4"), 6)
    real = transformers.video_utils.load_video
    monkeypatch.setattr(transformers.video_utils, "load_video", lambda *a, **k: (real(*a, **k)[0][:1], None))
    with pytest.raises(ImageError, match="decoded 1 of the 3 frames sampled"):
        load_video_frames(clip, 3)


# --- train.py and infer.py, end to end: single, multi-image, video and text-only records ---------

RED, BLUE = (220, 40, 40), (40, 70, 220)


@pytest.fixture(scope="module")
def mixed_run(tiny_base, tmp_path_factory):
    """train.py on one record of each kind plus a bad one: refused, then trained with
    --skip_bad_samples (three steps of two: every record goes through forward and backward)."""
    root = tmp_path_factory.mktemp("mixed")
    media = str(root / "media")
    save_image(os.path.join(media, "red.png"), size=(48, 48), color=RED)
    save_image(os.path.join(media, "blue.png"), size=(48, 48), color=BLUE)
    save_frames(os.path.join(media, "clip"), 5)
    save_video(os.path.join(media, "movie.mp4"), 6)
    rows = [
        record("single", image="red.png"),
        {"id": "two", "image": ["red.png", "blue.png"], "conversations": [
            {"from": "human", "value": "<image>\nWhat color are the shapes? <image>\nAnd these?"},
            {"from": "gpt", "value": "red"}, {"from": "human", "value": "And the second?"},
            {"from": "gpt", "value": "blue"}]},
        {"id": "video", "video": "clip", "conversations": [
            {"from": "human", "value": "<video>\nWhat color are the shapes?"}, {"from": "gpt", "value": "red"}]},
        {"id": "movie", "video": "movie.mp4", "conversations": [
            {"from": "human", "value": "What color are the shapes?"}, {"from": "gpt", "value": "red"}]},
        record("text", image=None),
        record("bad", image="nope.png"),
    ]
    path = write_jsonl(root / "mixed.jsonl", rows)
    out = str(root / "run")
    argv = [
        "configs/demo.yaml", "--vision_model", tiny_base["vision"], "--llm_model", tiny_base["llm"],
        "--data_path", path, "--image_folder", media, "--eval_data_path", "", "--num_frames", "2",
        "--data_check_cache", str(root / "cache"), "--output_dir", out,
        "--max_steps", "3", "--per_device_train_batch_size", "2", "--group_by_modality_length", "true",
    ]
    with pytest.raises(DataError) as refused:
        train.main(argv)
    refused_before_step_1 = not os.path.exists(os.path.join(out, "delta.safetensors"))
    train.main([*argv, "--skip_bad_samples", "true"])
    return {"out": out, "media": media, "data": path, "refused": str(refused.value),
            "refused_before_step_1": refused_before_step_1}


def test_train_refuses_bad_data_and_skip_bad_samples_trains_on_the_rest(mixed_run):
    assert "line 6 (id bad): missing image file" in mixed_run["refused"]
    assert mixed_run["refused_before_step_1"]
    assert os.path.isfile(os.path.join(mixed_run["out"], "delta.safetensors"))
    with open(os.path.join(mixed_run["out"], "skipped_records.jsonl")) as f:
        assert [json.loads(line)["id"] for line in f] == ["bad"]


@pytest.fixture(scope="module")
def mixed_checkpoint(mixed_run):
    return load_checkpoint(mixed_run["out"])


def test_multi_image_and_video_records_infer(mixed_run, mixed_checkpoint):
    model, inputs, _ = mixed_checkpoint
    records = read_records(mixed_run["data"], skip={5})
    prompts = {r["id"]: first_question(r, mixed_run["media"], num_frames=2) for r in records}
    for record_id, images in (("single", 1), ("two", 2), ("video", 2), ("movie", 2), ("text", 0)):
        messages, loaded, _ = prompts[record_id]
        ids = tokenize_prompt(inputs.tokenizer, messages, model.num_image_tokens, model.image_token_index)
        assert (len(loaded), ids.count(model.image_token_index)) == (images, images * model.num_image_tokens)
    results = predict_records(model, inputs, records, mixed_run["media"], num_frames=2)
    assert [r["id"] for r in results] == ["single", "two", "video", "movie", "text"]
    assert all(isinstance(r["prediction"], str) for r in results)


def spy_on_generation(monkeypatch):
    calls = []
    monkeypatch.setattr(infer, "generate_answers", lambda model, inputs, prompts, n: calls.append(prompts) or ["ok"])
    return calls


def test_infer_takes_several_images_in_order(mixed_run, mixed_checkpoint, monkeypatch, capsys):
    calls = spy_on_generation(monkeypatch)
    red, blue = (os.path.join(mixed_run["media"], n) for n in ("red.png", "blue.png"))
    infer.main(["--checkpoint", mixed_run["out"], "--image", red, blue, "--prompt", "What color are the shapes?"])
    ((messages, images),) = calls[0]
    assert messages == [{"role": "user", "content": "<image>\n<image>\nWhat color are the shapes?"}]
    assert [pixel(image) for image in images] == [RED, BLUE]
    assert capsys.readouterr().out.endswith("ok\n")
    with pytest.raises(SystemExit, match="1 <image> markers for 2 images"):
        infer.main(["--checkpoint", mixed_run["out"], "--image", red, blue, "--prompt", "<image> which?"])
    # And the real model answers that prompt (it raises when image tokens and images disagree).
    model, inputs, _ = mixed_checkpoint
    (answer,) = generate_answers(model, inputs, [(messages, images)], max_new_tokens=4)
    assert isinstance(answer, str)


def test_infer_takes_a_video(mixed_run, monkeypatch):
    calls = spy_on_generation(monkeypatch)
    clip = os.path.join(mixed_run["media"], "clip")
    infer.main(["--checkpoint", mixed_run["out"], "--video", clip, "--num_frames", "2", "--prompt", "What color?"])
    ((messages, images),) = calls[0]
    assert messages == [{"role": "user", "content": "<image><image>\nWhat color?"}]
    assert [pixel(image) for image in images] == [(10, 0, 0), (30, 0, 0)]  # frames 1 and 3 of 5


def test_infer_takes_a_video_file(mixed_run, mixed_checkpoint, monkeypatch):
    calls = spy_on_generation(monkeypatch)
    movie = os.path.join(mixed_run["media"], "movie.mp4")
    infer.main(
        ["--checkpoint", mixed_run["out"], "--video", movie, "--num_frames", "3", "--prompt", "What color?"]
    )
    ((messages, images),) = calls[0]
    assert messages == [{"role": "user", "content": "<image><image><image>\nWhat color?"}]
    assert [frame_number(image) for image in images] == [1, 3, 5]  # of 6
    model, inputs, _ = mixed_checkpoint
    (answer,) = generate_answers(model, inputs, [(messages, images)], max_new_tokens=4)
    assert isinstance(answer, str)
