"""Data as others write it: a UTF-8 byte-order mark and CRLF line ends in JSON and JSONL,
MiniCPM-V's fine-tuning format (role/content turns, a dict of images whose placeholders stand in
the text), absolute image paths inside --image_folder; and a refusal that never offers
--skip_bad_samples when no record would be left to train on."""

from __future__ import annotations

import json
import os

import pytest
from helpers import check_training, data_args
from PIL import Image

from data.dataset import read_records, record_messages, supervised_dataset
from data.prompt import IMAGE_MARKER, llava_to_messages
from data.records import DataError
from data.validate import validate_data_file

N_IMAGE, IMAGE_TOKEN = 4, -200
RED, BLUE, GREEN = (220, 40, 40), (40, 70, 220), (30, 180, 60)
BOM = b"\xef\xbb\xbf"


@pytest.fixture
def folder(tmp_path):
    """An image folder with red.png, blue.png and green.png."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name, color in (("red.png", RED), ("blue.png", BLUE), ("green.png", GREEN)):
        Image.new("RGB", (8, 8), color).save(folder / name)
    return str(folder)


@pytest.fixture
def check(tiny_tokenizer):
    def run(data_path, image_folder):
        return validate_data_file(str(data_path), tiny_tokenizer, N_IMAGE, IMAGE_TOKEN, 256, image_folder)

    return run


def llava(record_id, image="red.png", question=IMAGE_MARKER + "\nWhat color?", answer="red") -> dict:
    return {"id": record_id, "image": image,
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def minicpm(record_id, image, *turns: str) -> dict:
    """MiniCPM-V's record: turns alternate user, assistant."""
    roles = ("user", "assistant")
    return {"id": record_id, "image": image,
            "conversations": [{"role": roles[k % 2], "content": text} for k, text in enumerate(turns)]}


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def only_problem(report, kind):
    assert [p.kind for p in report.problems] == [kind], [str(p) for p in report.problems]
    return report.problems[0]


def colors(example) -> list[tuple]:
    return [image.getpixel((0, 0)) for image in example["images"]]


def dataset(path, folder, tokenizer, **kwargs):
    return supervised_dataset(str(path), folder, tokenizer, N_IMAGE, IMAGE_TOKEN, 256, **kwargs)


# --- a byte-order mark, CRLF, and what ends a JSONL line -------------------------------------------


@pytest.mark.parametrize("concatenated", [False, True], ids=["bom-crlf", "files-concatenated-with-their-marks"])
def test_jsonl_with_a_byte_order_mark_and_crlf_reads_every_record(check, tmp_path, folder, concatenated):
    lines = [json.dumps(llava(name)).encode() for name in ("a", "b", "c")]
    mark = BOM if concatenated else b""
    path = tmp_path / "d.jsonl"
    path.write_bytes(BOM + b"\r\n".join(mark + line for line in lines) + b"\r\n")
    report = check(path, folder)
    assert report.problems == [] and report.num_records == 3, [str(p) for p in report.problems]
    records = read_records(str(path))
    assert [r["id"] for r in records] == ["a", "b", "c"]
    assert records[2]["conversations"][1]["value"] == "red"  # no "\r" left on the line's last string


def test_json_list_with_a_byte_order_mark_and_crlf_reads(check, tmp_path, folder):
    path = tmp_path / "d.json"
    text = json.dumps([llava("a"), llava("b")], indent=1).replace("\n", "\r\n")
    path.write_bytes(BOM + text.encode())
    report = check(path, folder)
    assert report.problems == [] and report.num_records == 2, [str(p) for p in report.problems]


def test_a_jsonl_line_ends_only_at_a_newline(check, tmp_path, folder):
    # JSON allows U+2028, U+0085 and (read leniently) a raw "\r" inside a string; str.splitlines
    # would cut each of these records in two bad halves.
    answers = ["red\u2028line", "red\x85next", "red\rstray"]
    text = "".join(json.dumps(llava(str(k), answer=a), ensure_ascii=False) + "\n" for k, a in enumerate(answers))
    path = tmp_path / "d.jsonl"
    path.write_bytes((text + '{"id": "broken",\n').encode())
    report = check(path, folder)
    problem = only_problem(report, "malformed_json")
    assert problem.location == "line 4" and report.num_records == 4
    assert [r["conversations"][1]["value"] for r in read_records(str(path), skip={3})] == answers


# --- MiniCPM-V's fine-tuning format ----------------------------------------------------------------


def test_minicpm_single_image_records_read_as_llava(check, tmp_path, folder, tiny_tokenizer):
    rows = [
        minicpm("0", "red.png", "<image>\nHow many desserts?", "Three.", "What type?", "Cakes."),
        minicpm("1", "blue.png", "What color?", "blue"),  # no <image>: it goes before the question
    ]
    path = tmp_path / "minicpm.json"
    path.write_text(json.dumps(rows))
    assert check(path, folder).problems == []

    first, second = read_records(str(path))
    assert record_messages(first, folder, 8) == llava_to_messages([
        {"from": "human", "value": "<image>\nHow many desserts?"}, {"from": "gpt", "value": "Three."},
        {"from": "human", "value": "What type?"}, {"from": "gpt", "value": "Cakes."},
    ], 1)
    assert record_messages(second, folder, 8)[0] == {"role": "user", "content": "<image>\nWhat color?"}
    data = dataset(path, folder, tiny_tokenizer)
    assert [colors(data[i]) for i in range(2)] == [[RED], [BLUE]]
    assert all(data[i]["input_ids"].tolist().count(IMAGE_TOKEN) == N_IMAGE for i in range(2))


def test_minicpm_image_dict_places_each_image_at_its_placeholder(check, tmp_path, folder, tiny_tokenizer):
    # The text names the images in another order than the dict lists them: the text's order wins.
    images = {"<image_00>": "red.png", "<image_01>": "blue.png", "<image_02>": "green.png"}
    row = minicpm("0", images, "Compare\n<image_01>\nwith\n<image_00>\n", "blue, then red",
                  "And\n<image_02>\n?", "green")
    path = tmp_path / "minicpm.json"
    path.write_text(json.dumps([row]))
    assert check(path, folder).problems == []

    (record,) = read_records(str(path))
    assert record["image"] == ["blue.png", "red.png", "green.png"]
    messages = record_messages(record, folder, 8)
    assert not any("<image_" in m["content"] for m in messages)
    assert messages[0]["content"] == f"Compare\n{IMAGE_MARKER}\nwith\n{IMAGE_MARKER}\n"
    example = dataset(path, folder, tiny_tokenizer)[0]
    assert colors(example) == [BLUE, RED, GREEN]
    assert example["input_ids"].tolist().count(IMAGE_TOKEN) == 3 * N_IMAGE


@pytest.mark.parametrize(
    "bad, named",
    [
        (minicpm("bad", {"<image_00>": "red.png", "<image_01>": "blue.png"}, "<image_00>\nWhat?", "red"),
         ["'<image_01>'", "appears in no turn"]),
        (minicpm("bad", {"<image_00>": "red.png"}, "<image_00>\nand <image_01>\nWhat?", "red"),
         ["'<image_01>'", "not a key of 'image'"]),
        # The hand conversion: MiniCPM-V's text kept, its dict turned into a list.
        (llava("bad", image=["red.png", "blue.png"], question="<image_00>\nand\n<image_01>\nWhat?"),
         ["'<image_00>'", "would stay in the prompt", IMAGE_MARKER]),
        (minicpm("bad", "red.png", "<image_00>\nWhat?", "red"), ["'<image_00>'", "would stay in the prompt"]),
    ],
    ids=["key-not-in-the-text", "placeholder-not-a-key", "hand-converted-list", "hand-converted-name"],
)
def test_a_placeholder_that_would_stay_in_the_text_is_an_error(check, tmp_path, folder, tiny_tokenizer, bad, named):
    path = write_jsonl(tmp_path / "d.jsonl", [llava("good-1"), bad, llava("good-2")])
    problem = only_problem(check(path, folder), "image_placeholder")
    assert (problem.location, problem.record_id, problem.severity) == ("line 2", "bad", "error")
    assert all(part in problem.reason for part in named), problem.reason
    # Without the check too (--validate_data false, infer.py --data) the record is never read as text.
    with pytest.raises(DataError, match=r"line 2 \(id bad\).*<image_0"):
        read_records(path)
    assert len(dataset(path, folder, tiny_tokenizer, skip={1})) == 2  # --skip_bad_samples: the rest train


@pytest.mark.parametrize(
    "bad, kind, named",
    [
        (minicpm("bad", {"<image_00>": "red.png", "<image_01>": "nope.png"}, "<image_00><image_01>\nQ?", "A"),
         "missing_image", "nope.png"),
        (minicpm("bad", "red.png", "What color?", " "), "empty_answer", "turn 1"),
        (minicpm("bad", "red.png", "What color?", "red", "And?"), "ends_on_human", "ends without an answer"),
    ],
    ids=["missing-image-in-the-dict", "empty-answer", "ends-on-the-user"],
)
def test_minicpm_records_are_checked_like_any_other(check, tmp_path, folder, bad, kind, named):
    path = write_jsonl(tmp_path / "d.jsonl", [minicpm("good", "red.png", "Q?", "A"), bad])
    problem = only_problem(check(path, folder), kind)
    assert (problem.location, problem.record_id) == ("line 2", "bad") and named in problem.reason


# --- absolute image paths ------------------------------------------------------------------------------


def test_absolute_image_paths_inside_image_folder_are_read(check, tmp_path, folder, tiny_tokenizer):
    red, blue = (os.path.join(folder, name) for name in ("red.png", "blue.png"))  # as MiniCPM-V's docs write them
    rows = [minicpm("0", {"<image_00>": blue, "<image_01>": red}, "<image_01>\n<image_00>\nQ?", "A"),
            llava("1", image=red), llava("2", image="blue.png")]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert check(path, folder).problems == []
    data = dataset(path, folder, tiny_tokenizer)
    assert [colors(data[i]) for i in range(3)] == [[RED, BLUE], [RED], [BLUE]]


@pytest.mark.parametrize("named_folder", ["images", None], ids=["outside-image-folder", "no-image-folder"])
def test_an_absolute_path_outside_the_named_folder_is_refused_saying_how_to_allow_it(
    check, tmp_path, folder, named_folder
):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    secret = str(elsewhere / "secret.png")
    Image.new("RGB", (8, 8), RED).save(secret)  # exists: refused for where it is, not for missing
    path = write_jsonl(tmp_path / "d.jsonl", [llava("bad", image=secret)])
    problem = only_problem(check(path, named_folder and folder), "image_path")
    assert problem.record_id == "bad" and secret in problem.reason
    assert f"--image_folder {elsewhere}" in problem.reason  # the way to allow it
    assert check(path, str(elsewhere)).problems == []  # ... which works


# --- when no record is usable ----------------------------------------------------------------------


@pytest.mark.parametrize("skip_bad_samples", [False, True])
def test_when_every_record_is_bad_the_refusal_does_not_offer_skipping(tmp_path, folder, tiny_tokenizer, skip_bad_samples):
    path = write_jsonl(tmp_path / "d.jsonl", [llava("a", image="nope.png"), llava("b", image="gone.png")])
    args = data_args(path, folder, tmp_path, skip_bad_samples=skip_bad_samples)
    with pytest.raises(DataError) as error:
        check_training(args, tiny_tokenizer, N_IMAGE, IMAGE_TOKEN, str(tmp_path / "out"))
    message = str(error.value)
    assert "--skip_bad_samples true" not in message and "the other 0" not in message
    assert "No record is usable" in message and "missing_image" in message and "--image_folder" in message
    assert "line 1 (id a)" in message


def test_with_some_good_records_the_refusal_still_offers_skipping(tmp_path, folder, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [llava("a"), llava("bad", image="nope.png"), llava("c")])
    with pytest.raises(DataError, match="--skip_bad_samples true to train on the other 2"):
        check_training(data_args(path, folder, tmp_path), tiny_tokenizer, N_IMAGE, IMAGE_TOKEN, None)
