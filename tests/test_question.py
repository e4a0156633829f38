"""One rule per question: a typed question (with images, or a video's frames) becomes messages by
`data.prompt.question_messages` in infer.py --prompt and on the web page alike; a record's first
question is `run.predict.first_question`'s in infer.py --data, evaluation and on the web page
(a system turn kept). The page's handlers are called directly: no server, no browser, no model."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

import infer
import scripts.web_demo_answers
from data.dataset import read_records
from data.media import load_image, video_frame_paths
from data.prompt import MarkerMismatch, question_messages
from run.predict import first_question

COLORS = {"red.png": (255, 0, 0), "blue.png": (0, 0, 255), "green.png": (0, 255, 0)}


@pytest.fixture(scope="module")
def web_demo():
    """The page's question and answer handlers (scripts/web_demo_answers.py)."""
    return scripts.web_demo_answers


@pytest.fixture
def media(tmp_path) -> str:
    """red/blue/green.png, and clip/: 5 frames, frame i solid (40 * i, 0, 0)."""
    for name, color in COLORS.items():
        Image.new("RGB", (8, 8), color).save(tmp_path / name)
    os.makedirs(tmp_path / "clip")
    for i in range(5):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / "clip" / f"frame_{i}.png")
    return str(tmp_path)


def pixels(images) -> list:
    return [np.asarray(image).tolist() for image in images]


def spy(monkeypatch, module) -> list:
    """The (messages, images) a module's generate_answers is asked, in place of the model."""
    calls = []

    def fake(model, inputs, prompts, *args, **kwargs):
        calls.append(prompts)
        return ["ok"] * len(prompts)

    monkeypatch.setattr(module, "generate_answers", fake)
    return calls


def page_models() -> dict:
    return {"finetuned": object(), "base": None, "inputs": None}


def gallery_of(media: list, folder: str) -> list[tuple[str, None]]:
    """What the gallery hands the page's `answer`: (file, caption) pairs; decoded frames are kept
    as PNG files (the gallery's format="png"), as Gradio does."""
    paths = []
    for i, item in enumerate(media):
        if isinstance(item, Image.Image):
            path = os.path.join(folder, f"gallery_{i}.png")
            item.save(path)
            item = path
        paths.append(item)
    return [(path, None) for path in paths]


# --- a record's first question ----------------------------------------------------------------------


RECORDS = [
    {"id": "two-turns", "image": ["red.png", "blue.png"], "conversations": [
        {"from": "system", "value": "Answer with one word."},
        {"from": "human", "value": "<image>\nWhat color is it?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "<image>\nAnd this one?"},
        {"from": "gpt", "value": "blue"},
    ]},
    {"id": "no-markers", "image": "green.png", "conversations": [
        {"from": "system", "value": "You are terse."},
        {"from": "human", "value": "What color is it?"},
        {"from": "gpt", "value": "green"},
    ]},
    {"id": "frames", "video": "clip", "conversations": [
        {"from": "system", "value": "Describe videos."},
        {"from": "human", "value": "<video>\nWhat happens?"},
        {"from": "gpt", "value": "it reddens"},
    ]},
]


@pytest.mark.parametrize("index", range(len(RECORDS)))
def test_the_page_asks_a_picked_record_as_first_question_does(web_demo, media, tmp_path, monkeypatch, index):
    """Picked, then asked unchanged: exactly first_question's messages (the system turn too) and
    images, as infer.py --data asks; the question box and expected answer are that question's.
    Edited: a typed question, by question_messages."""
    with open(os.path.join(media, "data.json"), "w") as f:
        json.dump(RECORDS, f)
    records = read_records(os.path.join(media, "data.json"))
    messages, images, expected = first_question(records[index], media, 3)
    assert messages[0]["role"] == "system"

    shown, question, expected_box, status, picked = web_demo.pick_record(records, media, 3, str(index))
    assert status == "" and expected_box == expected
    assert question == next(m["content"] for m in messages if m["role"] == "user")
    calls = spy(monkeypatch, web_demo)
    gallery = gallery_of(shown, str(tmp_path))
    finetuned, _, status = web_demo.answer(page_models(), gallery, question, 8, "greedy", 1.0, picked)
    assert (finetuned, "Error" in status) == ("ok", False), status
    ((asked, asked_images),) = calls.pop()
    assert asked == messages
    assert pixels(asked_images) == pixels(images)

    edited = question + " Be brief."
    web_demo.answer(page_models(), gallery, edited, 8, "greedy", 1.0, picked)
    ((asked, _),) = calls.pop()
    assert asked == question_messages(edited, len(images)) and asked[0]["role"] == "user"


# --- a typed question ------------------------------------------------------------------------------


def through_the_rule(monkeypatch, module) -> list:
    """The calls the module makes to data.prompt.question_messages: the rule is one function,
    not a copy of it."""
    calls = []

    def recorded(*args, **kwargs):
        calls.append((args, kwargs))
        return question_messages(*args, **kwargs)

    monkeypatch.setattr(module, "question_messages", recorded)
    return calls


def ask_infer(monkeypatch, media: str, question: str, images: list[str] = (), video: str | None = None):
    """infer.py --prompt's messages and images, no checkpoint loaded."""
    calls, rule = spy(monkeypatch, infer), through_the_rule(monkeypatch, infer)
    monkeypatch.setattr(infer, "load_checkpoint", lambda *args, **kwargs: (None, None, None))
    argv = ["--checkpoint", media, "--prompt", question]
    argv += ["--image", *images] if images else []
    argv += ["--video", video, "--num_frames", "3"] if video else []
    try:
        infer.main(argv)
    finally:
        assert len(rule) == 1
    ((prompt,),) = calls
    return prompt


def ask_page(web_demo, monkeypatch, question: str, paths: list[str]):
    calls, rule = spy(monkeypatch, web_demo), through_the_rule(monkeypatch, web_demo)
    finetuned, _, status = web_demo.answer(page_models(), [(p, None) for p in paths], question, 8, "greedy", 1.0)
    assert (finetuned, "Error" in status) == ("ok", False), status
    assert len(rule) == 1
    ((prompt,),) = calls
    return prompt


@pytest.mark.parametrize("question, names", [
    ("What color are the shapes?", ["red.png", "blue.png"]),  # no markers: one per image, first
    ("<image> vs <image>: which is red?", ["red.png", "blue.png"]),  # markers where they stand
    ("Is the sky blue?", []),  # text only
])
def test_infer_prompt_and_the_page_build_the_same_messages(web_demo, media, monkeypatch, question, names):
    paths = [os.path.join(media, name) for name in names]
    infer_messages, infer_images = ask_infer(monkeypatch, media, question, images=paths)
    page_messages, page_images = ask_page(web_demo, monkeypatch, question, paths)
    assert infer_messages == page_messages == question_messages(question, len(paths))
    assert pixels(infer_images) == pixels(page_images) == [[[list(COLORS[n])] * 8] * 8 for n in names]


def test_a_video_question_is_the_same_in_infer_and_on_the_page(web_demo, media, monkeypatch):
    """infer.py --video; on the page, a question with <video> and the frames as its images."""
    question = "<video>\nWhat happens?"
    clip = os.path.join(media, "clip")
    infer_messages, infer_images = ask_infer(monkeypatch, media, question, video=clip)
    frames = video_frame_paths(clip, 3)
    page_messages, page_images = ask_page(web_demo, monkeypatch, question, frames)
    assert infer_messages == page_messages == question_messages(question, 3, video=True)
    assert page_messages == [{"role": "user", "content": "<image><image><image>\nWhat happens?"}]
    assert pixels(infer_images) == pixels(page_images) == pixels(load_image(p) for p in frames)


def test_markers_not_one_per_image_are_one_error_everywhere(web_demo, media, monkeypatch):
    question, paths = "<image> which one?", [os.path.join(media, n) for n in ("red.png", "blue.png")]
    with pytest.raises(MarkerMismatch, match="1 <image> markers for 2 images: give one marker per image") as raised:
        question_messages(question, 2)
    assert (raised.value.markers, raised.value.num_images) == (1, 2)
    assert issubclass(MarkerMismatch, ValueError)

    with pytest.raises(SystemExit, match="--prompt has 1 <image> markers for 2 images") as exited:
        ask_infer(monkeypatch, media, question, images=paths)
    assert isinstance(exited.value.__cause__, MarkerMismatch)

    images = web_demo.read_images(paths)
    with pytest.raises(web_demo.PageError, match="1 `<image>` marker\\(s\\) for 2 image\\(s\\)") as refused:
        web_demo.build_prompt(question, images)
    assert isinstance(refused.value.__cause__, MarkerMismatch)
    calls = spy(monkeypatch, web_demo)
    finetuned, base, status = web_demo.answer(page_models(), [(p, None) for p in paths], question, 8, "greedy", 1.0)
    assert (finetuned, base, calls) == ("", "", []) and status.startswith("**Error:** The question has 1")
