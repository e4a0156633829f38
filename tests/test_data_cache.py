"""The one pass over the records and its cache: the same samples as the record-by-record path
it replaced, built once and read back with nothing tokenized, built again when anything it
depends on changes, never read when a pass was cut off, shared by the ranks of a node."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO_ROOT, SUBPROCESS_ENV, save_video, torchrun_train
from PIL import Image
from transformers import AutoTokenizer

import data.chunk_check as chunk_check
import data.one_pass as one_pass
import data.validate as validate
from config import DataArguments
from constants import IGNORE_INDEX
from data.dataset import read_records, record_messages, supervised_dataset
from data.inputs import ComposedInputs
from data.prompt import IMAGE_MARKER, SampleTooLong, fit_length, split_supervised
from data.records import iter_records

N_IMAGE, IMAGE_TOKEN, MAX_LENGTH = 4, -200, 96
# Renders every answer but "blue": a record answering only "blue" has nothing to learn.
BLUE_UNSAID = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] != 'blue' %}"
    "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def turns(*texts: str) -> list[dict]:
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": t} for k, t in enumerate(texts)]


@pytest.fixture(scope="module")
def every_form(tmp_path_factory) -> dict:
    """A JSONL file of every record form, its media folder, and the positions its check skips."""
    root = tmp_path_factory.mktemp("every_form")
    for name, color in (("red.png", (220, 40, 40)), ("blue.png", (40, 70, 220))):
        Image.new("RGB", (8, 8), color).save(root / name)
    os.makedirs(root / "clip")
    for k in range(5):
        Image.new("RGB", (8, 8), (40 * k, 0, 0)).save(root / "clip" / f"frame_{k}.png")
    save_video(str(root / "clip.mp4"), 6, size=16)
    rows = [
        {"id": "one", "image": "red.png", "conversations": turns("<image>\nWhat color?", "red")},
        {"id": "turns", "image": "red.png", "conversations": turns("What color?", "red", "Sure?", "yes, red")},
        {"id": "two", "image": ["red.png", "blue.png"], "conversations": turns("<image> and <image>?", "red, blue")},
        {"id": "frames", "video": "clip", "conversations": turns("<video>\nWhat happens?", "it darkens")},
        {"id": "file", "video": "clip.mp4", "conversations": turns("What happens?", "it brightens")},
        {"id": "text", "conversations": turns("Is a square round?", "no")},
        {"id": 7, "image": "blue.png", "conversations": turns("Color?", "blue")},  # no labels: dropped
        {"id": "long", "image": "red.png", "conversations": turns("<image>\n" + "why " * 200, "red")},  # too long
        {"id": "cut", "conversations": turns("What?", "red " * 200)},  # cut: its answer's head trains
        {"id": "missing", "image": "nope.png", "conversations": turns("Color?", "red")},  # bad: skipped
        {"id": "roles", "conversations": turns("Color?", "red", "And?")},  # bad: ends on a question
        {"id": "minicpm", "image": {"<image_00>": "red.png"},
         "conversations": [{"role": "user", "content": "<image_00>\nColor?"}, {"role": "assistant", "content": "red"}]},
    ]
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")  # and a malformed line
    return {"path": str(path), "folder": str(root)}


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base["llm"])  # a copy: the shared one stays intact
    tokenizer.chat_template = BLUE_UNSAID
    return tokenizer


def data_args(form, cache, **overrides) -> DataArguments:
    settings = dict(data_path=form["path"], image_folder=form["folder"], max_length=MAX_LENGTH,
                    data_check_cache=str(cache), skip_bad_samples=True, num_frames=3)
    return DataArguments(**{**settings, **overrides})


def training_set(tokenizer, args, num_image_tokens=N_IMAGE):
    return ComposedInputs(tokenizer, None, num_image_tokens, IMAGE_TOKEN).training_set(args, None)


def todays_tokenization(tokenizer, messages) -> tuple[list[int], list[int]]:
    """A frozen copy of the record-by-record tokenization the pass replaced: each text between
    image markers of each supervised piece through its own tokenizer call."""
    input_ids, labels = [], []
    for text, supervised in split_supervised(tokenizer, messages):
        ids = []
        for k, chunk in enumerate(text.split(IMAGE_MARKER)):
            ids += [IMAGE_TOKEN] * N_IMAGE if k else []
            ids += tokenizer(chunk, add_special_tokens=False).input_ids if chunk else []
        input_ids += ids
        labels += ids if supervised else [IGNORE_INDEX] * len(ids)
    return fit_length(input_ids, labels, IMAGE_TOKEN, MAX_LENGTH)


def todays_samples(form, tokenizer, skip) -> list[tuple[list[int], list[int], dict]]:
    """The samples as the record-by-record path made them before the one pass: each record read,
    its messages built and tokenized alone, too long and fully masked ones dropped."""
    samples = []
    for record in read_records(form["path"], skip):
        messages = record_messages(record, form["folder"], 3)
        try:
            ids, labels = todays_tokenization(tokenizer, messages)
        except SampleTooLong:
            continue
        if any(label != IGNORE_INDEX for label in labels):
            samples.append((ids, labels, {"image": record["image"], "video": record["video"]}))
    return samples


def test_the_pass_yields_exactly_todays_samples(every_form, tokenizer, tmp_path):
    dataset = training_set(tokenizer, data_args(every_form, tmp_path))
    skip = {raw.position for raw in iter_records(every_form["path"]) if raw.record_id in ("missing", "roles")}
    skip.add(12)  # the malformed line
    report = dataset.prepared.report
    assert report.skip_positions() - skip == {6, 7}  # no labels, too long: dropped by the pass
    expected = todays_samples(every_form, tokenizer, skip)
    assert len(dataset) == len(expected) == 8
    for k, (ids, labels, media) in enumerate(expected):
        sample = dataset[k]
        assert sample["input_ids"].tolist() == ids and sample["labels"].tolist() == labels
        assert {key: dataset.record(k)[key] for key in media} == media
        assert len(sample["images"]) == (3 if media["video"] else len(media["image"]))  # 3 frames a video
    assert dataset.lengths() == [len(ids) for ids, _, _ in expected]
    assert dataset.multimodal() == [bool(m["image"] or m["video"]) for _, _, m in expected]


def test_a_list_and_its_jsonl_give_the_same_samples(every_form, tokenizer, tmp_path):
    records = [raw.record for raw in iter_records(every_form["path"]) if raw.record is not None]
    as_list = tmp_path / "data.json"
    as_list.write_text(json.dumps(records, indent=1))
    jsonl = supervised_dataset(every_form["path"], every_form["folder"], tokenizer, N_IMAGE, IMAGE_TOKEN, MAX_LENGTH,
                               num_frames=3)
    listed = supervised_dataset(str(as_list), every_form["folder"], tokenizer, N_IMAGE, IMAGE_TOKEN, MAX_LENGTH,
                                num_frames=3)
    assert np.array_equal(jsonl.prepared.ids, listed.prepared.ids)
    assert np.array_equal(jsonl.prepared.labels, listed.prepared.labels)


@pytest.fixture
def counted(monkeypatch):
    """Counts the passes run and the conversations tokenized (in this process: one worker)."""
    calls = {"passes": 0, "tokenized": 0}
    real_pass, real_tokenize = validate.run_pass, chunk_check.tokenize_conversations

    def run_pass(*args, **kwargs):
        calls["passes"] += 1
        return real_pass(*args, **kwargs)

    def tokenize(tokenizer, conversations, *args):
        calls["tokenized"] += len(conversations)
        return real_tokenize(tokenizer, conversations, *args)

    monkeypatch.setattr(validate, "run_pass", run_pass)
    monkeypatch.setattr(chunk_check, "tokenize_conversations", tokenize)
    monkeypatch.setattr(one_pass, "free_cores", lambda: 1)
    return calls


def test_a_rerun_reads_the_cache_and_tokenizes_nothing(every_form, tokenizer, tmp_path, counted):
    first = training_set(tokenizer, data_args(every_form, tmp_path))
    made = dict(counted)
    assert made["passes"] == 1 and made["tokenized"] >= len(first)
    again = training_set(tokenizer, data_args(every_form, tmp_path))
    assert counted == made  # no pass, nothing tokenized
    assert isinstance(again.prepared.ids, np.memmap)  # mapped, not loaded
    assert [again[k]["input_ids"].tolist() for k in range(len(again))] == [
        first[k]["input_ids"].tolist() for k in range(len(first))]


@pytest.mark.parametrize("change", ["max_length", "image_folder", "num_frames", "template", "image_tokens", "file"])
def test_any_change_of_what_the_samples_depend_on_builds_again(every_form, tokenizer, tmp_path, counted, change):
    form = dict(every_form)
    training_set(tokenizer, data_args(form, tmp_path))
    overrides, num_image_tokens, changed = {}, N_IMAGE, tokenizer
    if change == "max_length":
        overrides["max_length"] = MAX_LENGTH + 1
    elif change == "image_folder":
        os.symlink(form["folder"], tmp_path / "same")
        overrides["image_folder"] = str(tmp_path / "same")
    elif change == "num_frames":
        overrides["num_frames"] = 2
    elif change == "template":
        changed = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
        changed.chat_template = BLUE_UNSAID.replace("<|im_end|>\n", "<|im_end|>\n\n")
    elif change == "image_tokens":
        num_image_tokens = N_IMAGE + 1
    else:
        edited = tmp_path / "edited.jsonl"
        with open(form["path"]) as f:
            edited.write_text(f.read().replace('"red"}', '"crimson"}', 1))
        overrides["data_path"] = str(edited)
    training_set(changed, data_args(form, tmp_path, **overrides), num_image_tokens)
    assert counted["passes"] == 2
    training_set(changed, data_args(form, tmp_path, **overrides), num_image_tokens)
    assert counted["passes"] == 2  # and that one is cached in turn


KILLED_MID_WRITE = """
import os, sys, time
sys.path.insert(0, {repo!r})
import data.prepared as prepared
from transformers import AutoTokenizer
from config import DataArguments
from data.inputs import ComposedInputs

def stuck(self, report):  # the samples are on disk; the report and the marker never come
    self.flush()
    print("writing", flush=True)
    time.sleep(600)

prepared.PreparedWriter.finish = stuck
tokenizer = AutoTokenizer.from_pretrained({llm!r})
args = DataArguments(data_path={path!r}, image_folder={folder!r}, max_length=96, data_check_cache={cache!r},
                     skip_bad_samples=True, num_frames=3)
ComposedInputs(tokenizer, None, 4, -200).training_set(args, None)
"""


@pytest.mark.slow
def test_a_pass_killed_mid_write_is_never_read_and_is_built_again(every_form, tiny_base, tmp_path, counted):
    cache = tmp_path / "cache"
    script = KILLED_MID_WRITE.format(repo=REPO_ROOT, llm=tiny_base["llm"], path=every_form["path"],
                                     folder=every_form["folder"], cache=str(cache))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=SUBPROCESS_ENV)
    assert child.stdout.readline().strip() == "writing"
    child.send_signal(signal.SIGKILL)
    child.wait()
    (partial,) = [d for d in os.listdir(cache) if ".partial-" in d]
    assert os.path.getsize(cache / partial / "ids.bin") > 0  # it was cut off with samples written
    tokenizer = AutoTokenizer.from_pretrained(tiny_base["llm"])
    dataset = training_set(tokenizer, data_args(every_form, cache))
    assert counted["passes"] == 1 and len(dataset) > 0
    assert [d for d in os.listdir(cache) if ".partial-" in d] == []  # the cut-off one is gone
    # A folder without its marker (however it came to be) is not read either.
    (folder,) = [d for d in os.listdir(cache) if not d.endswith(".lock")]
    os.remove(cache / folder / "COMPLETE")
    training_set(tokenizer, data_args(every_form, cache))
    assert counted["passes"] == 2


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_read_one_cache(tiny_base, demo_data, tmp_path):
    """Under torchrun the node's first rank makes the pass; the other waits and maps its files."""
    cache = tmp_path / "cache"
    log = torchrun_train(2, tiny_base, demo_data, tmp_path / "run", "--data_check_cache", str(cache))
    assert log.count("data pass: 64 records") == 1, log[-3000:]
    (folder,) = [d for d in os.listdir(cache) if not d.endswith(".lock")]
    assert os.path.isfile(cache / folder / "COMPLETE")


def test_the_template_is_rendered_once_per_shape_and_the_pieces_are_unchanged(tokenizer, monkeypatch):
    """`tokenize_conversations` renders each conversation shape once and fills its contents in
    (data/template_shapes.py): the same ids and labels as rendering every prefix, in fewer renders;
    a content the template branches on ("blue", which BLUE_UNSAID leaves out) is rendered for real."""
    import data.prompt as prompt
    import data.template_shapes as template_shapes
    from data.prompt import tokenize_conversation, tokenize_conversations

    conversations = [[{"role": "user", "content": f"<image>\nWhat is {k}?"}, {"role": "assistant", "content": answer}]
                     for k, answer in enumerate(["red", " two  words ", "blue", "red\n", "x"] * 4)]
    conversations.append([*conversations[0], {"role": "user", "content": "And?"}, {"role": "assistant", "content": "y"}])
    expected = [todays_tokenization(tokenizer, messages) for messages in conversations]
    renders = []
    render = template_shapes.render_template
    shapes = template_shapes.ShapeRenders()
    assert [shapes.fits(tokenizer, m) for m in conversations] == [m[1]["content"] != "blue" for m in conversations]
    for module in (template_shapes, prompt):
        monkeypatch.setattr(module, "render_template", lambda *a, **k: renders.append(1) or render(*a, **k))
    assert tokenize_conversations(tokenizer, conversations, N_IMAGE, IMAGE_TOKEN, MAX_LENGTH) == expected
    shaped = len(renders)
    assert shaped < 2 * len(conversations)  # rendering every prefix: 3 renders each, 5 for the 2-turn one
    renders.clear()
    for messages, (ids, labels) in zip(conversations, expected, strict=True):
        assert tokenize_conversation(tokenizer, messages, N_IMAGE, IMAGE_TOKEN, MAX_LENGTH) == (ids, labels)
    assert len(renders) > shaped  # one conversation a batch: every shape rendered again
