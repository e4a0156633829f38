"""Hugging Face datasets in the messages format (typed content parts, an `images` column) become
the same LLaVA records, token ids, labels and pixels as the equivalent LLaVA file, and train."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import datasets
import pytest
from PIL import Image
from transformers import AutoImageProcessor

from data.dataset import Collator, SupervisedDataset
from data.messages import use_messages_dataset
from data.records import DataError

N_IMAGE, IMAGE_TOKEN = 4, -200
RED, BLUE = (220, 40, 40), (40, 70, 220)
QUESTION = "What color are the shapes?"


def messages_rows(images):
    return {
        "messages": [
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
             {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
             {"role": "user", "content": [{"type": "text", "text": "And the "}, {"type": "image"},
                                          {"type": "text", "text": QUESTION}]},
             {"role": "assistant", "content": [{"type": "text", "text": "blue"}]}],
            [{"role": "user", "content": [{"type": "text", "text": QUESTION}]},
             {"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
        ],
        "images": images,
    }


LLAVA_ROWS = [
    {"id": "0", "image": ["red.png", "blue.png"], "conversations": [
        {"from": "human", "value": "<image>\n" + QUESTION}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "And the <image>\n" + QUESTION}, {"from": "gpt", "value": "blue"}]},
    {"id": "1", "conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": "red"}]},
]


@pytest.fixture
def media(tmp_path):
    folder = tmp_path / "media"
    folder.mkdir()
    for name, color in (("red.png", RED), ("blue.png", BLUE)):
        Image.new("RGB", (48, 48), color).save(folder / name)
    llava = tmp_path / "llava.jsonl"
    llava.write_text("".join(json.dumps(r) + "\n" for r in LLAVA_ROWS))
    return {"folder": str(folder), "llava": str(llava)}


def saved_dataset(tmp_path, media) -> str:
    """A save_to_disk folder whose images column holds PIL images."""
    pil = [[Image.open(os.path.join(media["folder"], n)).convert("RGB") for n in ("red.png", "blue.png")], []]
    features = datasets.Features({
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.List(
            {"type": datasets.Value("string"), "text": datasets.Value("string")})}),
        "images": datasets.List(datasets.Image()),
    })
    path = str(tmp_path / "saved")
    datasets.Dataset.from_dict(messages_rows(pil), features=features).save_to_disk(path)
    return path


def data_args(**kw):
    return SimpleNamespace(**{"dataset_name": None, "data_path": None, "image_folder": None, "dataset_split": "train",
                              **kw})


def examples(path, folder, tokenizer, processor):
    dataset = SupervisedDataset(path, folder, tokenizer, N_IMAGE, IMAGE_TOKEN, 256)
    items = [dataset[i] for i in range(len(dataset))]
    return [(e["input_ids"].tolist(), e["labels"].tolist()) for e in items], Collator(
        tokenizer.pad_token_id, processor)(items)["pixel_values"]


@pytest.mark.parametrize("form", ["save_to_disk", "jsonl_with_paths"])
def test_messages_dataset_gives_the_llava_record_s_ids_labels_and_pixels(form, tmp_path, media, tiny_base,
                                                                          tiny_tokenizer):
    processor = AutoImageProcessor.from_pretrained(tiny_base["vision"])
    if form == "save_to_disk":
        args = data_args(dataset_name=saved_dataset(tmp_path, media))
    else:  # paths under --image_folder, given as --data_path
        path = tmp_path / "messages.jsonl"
        rows = messages_rows([["red.png", "blue.png"], []])
        path.write_text("".join(json.dumps({"messages": m, "images": i}) + "\n"
                                for m, i in zip(rows["messages"], rows["images"], strict=True)))
        args = data_args(data_path=str(path), image_folder=media["folder"])
    use_messages_dataset(args, str(tmp_path / "out"))
    assert args.data_path.endswith(".jsonl") and os.path.dirname(args.data_path).endswith("messages_data")
    converted, converted_pixels = examples(args.data_path, args.image_folder, tiny_tokenizer, processor)
    expected, expected_pixels = examples(media["llava"], media["folder"], tiny_tokenizer, processor)
    assert converted == expected
    assert sum(ids.count(IMAGE_TOKEN) for ids, _ in converted) == 2 * N_IMAGE
    assert converted_pixels.equal(expected_pixels)  # red then blue, the same pixels


def test_a_llava_file_is_left_as_it_is(media, tmp_path):
    args = data_args(data_path=media["llava"], image_folder=media["folder"])
    use_messages_dataset(args, str(tmp_path / "out"))
    assert (args.data_path, args.image_folder) == (media["llava"], media["folder"])


def test_an_unknown_content_part_names_the_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": [{"type": "audio"}]}], "images": []}) + "\n")
    with pytest.raises(DataError, match="row 0, turn 0"):
        use_messages_dataset(data_args(data_path=str(path)), str(tmp_path / "out"))


def test_train_py_trains_on_a_messages_dataset(tmp_path, media, tiny_base):
    import train

    out = str(tmp_path / "run")
    train.main([
        "configs/demo.yaml", "--vision_model", tiny_base["vision"], "--llm_model", tiny_base["llm"],
        "--build_tiny_base_if_missing", "false", "--make_demo_data_if_missing", "false",
        "--dataset_name", saved_dataset(tmp_path, media), "--eval_data_path", "",
        "--data_check_cache", str(tmp_path / "cache"), "--output_dir", out,
        "--max_steps", "2", "--per_device_train_batch_size", "2",
    ])
    assert os.path.isfile(os.path.join(out, "delta.safetensors"))
    assert len(os.listdir(os.path.join(out, "messages_data", "images"))) == 2
