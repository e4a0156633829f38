"""The web page's questions and answers: uploaded images read (refused in words when unreadable
or huge), a typed question made into messages by infer.py's --prompt rule, a picked --data
record asked as infer.py --data asks it, and both models' answers from the same
`generate_answers`. Imported by scripts/web_demo.py; not run on its own."""

from __future__ import annotations

import os

import gradio as gr
from PIL import Image

from data.media import load_image, record_media
from data.prompt import IMAGE_MARKER, VIDEO_MARKER, MarkerMismatch, question_messages
from data.records import DataError
from errors import UserError
from run.predict import first_question, generate_answers

MAX_PIXELS = 4096 * 4096  # a page anyone can post to gets a tighter cap than PIL's bomb limit


class PageError(UserError):
    """Bad input, said in a sentence the page shows instead of a traceback."""


def read_images(paths: list[str]) -> list[Image.Image]:
    images = []
    for path in paths:
        name = os.path.basename(path)
        try:
            with Image.open(path) as probe:  # the header only: refuse huge images before decoding
                width, height = probe.size
            if width * height > MAX_PIXELS:
                raise PageError(f"{name} is {width}x{height}: more than {MAX_PIXELS:,} pixels. Resize it.")
            images.append(load_image(path))
        except (OSError, DataError, Image.DecompressionBombError) as error:  # unreadable, truncated
            raise PageError(f"{name} cannot be read as an image ({error}).") from error
    return images


def build_prompt(question: str, images: list) -> list[dict]:
    """A typed question -> messages, by infer.py's --prompt rule (`question_messages`): markers
    where the question puts them, else one per image first; a `<video>` marker makes the images
    a video's frames, in time order."""
    try:
        return question_messages(question, len(images), video=VIDEO_MARKER in question)
    except MarkerMismatch as error:
        raise PageError(
            f"The question has {error.markers} `{IMAGE_MARKER}` marker(s) for {error.num_images} image(s): upload "
            "one image per marker, or remove the markers and the images all go before the question."
        ) from error


def _same_text(a: str, b: str) -> bool:
    return a.replace("\r\n", "\n") == b.replace("\r\n", "\n")  # a browser's textarea sends \n


def prompt_messages(question: str, images: list, picked: dict | None) -> list[dict]:
    """The messages asked. The picked record's question, unchanged: exactly `first_question`'s
    messages (a system turn included), as infer.py --data asks it; anything typed or edited:
    `build_prompt`."""
    if not (picked and _same_text(question, picked["question"])):
        return build_prompt(question, images)
    markers = sum(m["content"].count(IMAGE_MARKER) for m in picked["messages"])
    if markers != len(images):
        raise PageError(
            f"The record's question has {markers} `{IMAGE_MARKER}` marker(s) for {len(images)} image(s): "
            "pick the record again to restore its images, or edit the question."
        )
    return picked["messages"]


def answer(models: dict, gallery, question: str, max_new_tokens: int, mode: str, temperature: float,
           picked: dict | None = None):
    """Gradio handler -> (fine-tuned answer, base answer, status Markdown). `picked`: the
    picked record's question and messages (`pick_record`), or None."""
    try:
        if not (question or "").strip():
            raise PageError("Type a question first.")
        images = read_images([item[0] for item in gallery or []])
        prompt = [(prompt_messages(question, images, picked), images)]
    except PageError as error:
        return "", "", f"**Error:** {error}"
    sampling = {"do_sample": mode == "sample", "temperature": temperature}
    answers = [
        generate_answers(m, models["inputs"], prompt, int(max_new_tokens), **sampling)[0]
        if m is not None else "(not loaded: --compare_base false)"
        for m in (models["finetuned"], models["base"])
    ]
    notes = [] if images else ["No image: asked as a text-only question."]
    notes += [f"The {name} model answered nothing (it ended the answer at once)."
              for name, text in zip(("fine-tuned", "base"), answers, strict=True) if not text]
    return answers[0], answers[1], " ".join(notes)


def pick_record(records: list[dict], image_folder: str | None, num_frames: int, index):
    """A --data record -> (its first question's images or frames, that question, expected answer,
    status, picked). The question is `first_question`'s, the rule infer.py --data and train.py's
    evaluation ask by; `picked` keeps its messages (a system turn included) for `answer`."""
    if index is None:
        return gr.skip(), gr.skip(), gr.skip(), "", gr.skip()
    record = records[int(index)]
    try:
        messages, images, expected = first_question(record, image_folder, num_frames)
        # Paths where the media are files (Gradio serves them), a video file's decoded frames.
        media = record_media(record, image_folder, num_frames)[: len(images)]
    except DataError as error:
        return None, "", "", f"**Error:** this record cannot be read: {error}", None
    question = next((m["content"] for m in messages if m["role"] == "user"), "")
    return media, question, expected or "", "", {"question": question, "messages": messages}
