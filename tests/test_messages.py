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

import infer
import train
from data.dataset import Collator, SupervisedDataset, read_records
from data.messages import use_messages_dataset
from data.records import DataError
from run import predict

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
                              "eval_data_path": None, "eval_image_folder": None, "eval_dataset_split": "test", **kw})


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
    assert args.data_path.endswith("records.jsonl") and os.sep + "messages_data" + os.sep in args.data_path
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


@pytest.mark.slow
def test_train_py_trains_on_a_messages_dataset(tmp_path, media, tiny_base):
    out = str(tmp_path / "run")
    train.main([
        "configs/demo.yaml", "--vision_model", tiny_base["vision"], "--llm_model", tiny_base["llm"],
        "--dataset_name", saved_dataset(tmp_path, media), "--eval_data_path", "",
        "--data_check_cache", str(tmp_path / "cache"), "--output_dir", out,
        "--max_steps", "2", "--per_device_train_batch_size", "2",
    ])
    assert os.path.isfile(os.path.join(out, "delta.safetensors"))
    (converted,) = os.listdir(os.path.join(out, "messages_data"))  # one folder per dataset fingerprint
    assert len(os.listdir(os.path.join(out, "messages_data", converted, "images"))) == 2


def messages_jsonl(tmp_path, name="messages.jsonl") -> str:
    """The two rows of messages_rows, images as paths under media["folder"]."""
    path = tmp_path / name
    rows = messages_rows([["red.png", "blue.png"], []])
    path.write_text("".join(json.dumps({"messages": m, "images": i}) + "\n"
                            for m, i in zip(rows["messages"], rows["images"], strict=True)))
    return str(path)


def test_training_and_eval_sets_in_messages_format_are_converted_apart(tmp_path, media):
    """Both given as datasets holding PIL images: each gets its own folder, so their images
    (named by row) never overwrite each other; the eval set keeps the training set's image folder
    rule (the folder given) when it holds paths."""
    train_set = saved_dataset(tmp_path, media)
    args = data_args(dataset_name=train_set, eval_data_path=messages_jsonl(tmp_path), image_folder=media["folder"])
    use_messages_dataset(args, str(tmp_path / "out"))
    assert os.path.dirname(args.data_path) == args.image_folder != media["folder"]  # PIL images written there
    assert args.eval_image_folder == media["folder"]  # paths: the folder given
    assert os.path.dirname(args.eval_data_path) != os.path.dirname(args.data_path)
    (first, _) = read_records(args.eval_data_path)
    assert first["image"] == ["red.png", "blue.png"]
    assert first["conversations"][0] == {"from": "user", "value": "<image>\n" + QUESTION}


def test_a_missing_llava_file_is_not_taken_for_a_hub_id(tmp_path):
    args = data_args(data_path=str(tmp_path / "nope.json"), eval_data_path=str(tmp_path / "gone.jsonl"))
    use_messages_dataset(args, str(tmp_path / "out"))  # left to the reader, which names the file
    assert (args.data_path, args.eval_data_path) == (str(tmp_path / "nope.json"), str(tmp_path / "gone.jsonl"))


@pytest.mark.slow
def test_infer_answers_a_messages_file(tmp_path, media, tiny_base, monkeypatch, capsys):
    """infer.py --data reads a messages-format file as train.py reads it: the same prompts, images."""
    out = str(tmp_path / "run")

    train.main([
        "configs/demo.yaml", "--vision_model", tiny_base["vision"], "--llm_model", tiny_base["llm"],
        "--data_path", media["llava"], "--image_folder", media["folder"], "--eval_data_path", "",
        "--data_check_cache", str(tmp_path / "cache"), "--output_dir", out,
        "--max_steps", "1", "--per_device_train_batch_size", "2",
    ])
    seen = []
    real = predict.first_question

    def spy(record, image_folder, num_frames=8):
        messages, images, expected = real(record, image_folder, num_frames)
        seen.append((messages, [image.tobytes() for image in images], expected))
        return messages, images, expected

    monkeypatch.setattr(predict, "first_question", spy)
    for data in (messages_jsonl(tmp_path), media["llava"]):
        infer.main(["--checkpoint", out, "--data", data, "--image_folder", media["folder"], "--max_new_tokens", "2"])
        assert capsys.readouterr().out.splitlines()[-1].startswith("accuracy: ")
    # Each record asked once per format: the same prompt, the same pixels, the same answer.
    assert len(seen) == 4 and seen[:2] == seen[2:]
    assert len(seen[0][1]) == 1 and seen[0][0][-1]["content"] == "<image>\n" + QUESTION
