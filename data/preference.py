"""Preference pairs: a prompt with its images, a chosen and a rejected answer, read from the
formats people have, checked before step 1 as supervised records are.

Three record shapes are read (one file may mix them), each into one pair:

- RLAIF-V's: `{"image": "a.jpg", "question": "...", "chosen": "...", "rejected": "..."}`;
- TRL's vision preference format: `{"images": ["a.jpg"], "prompt": ..., "chosen": ..., "rejected": ...}`,
  each of prompt / chosen / rejected a string or a list of chat messages (content a string or
  typed parts, `{"type": "image"}` where an image goes);
- LLaVA's: `{"image", "conversations": [... ending on a human turn], "chosen", "rejected"}`, or the
  conversation ending on its chosen gpt turn and `"rejected"` beside it (ms-swift's shape).

The check is the supervised one (data/validate.py), run twice: on the prompt + chosen answer and
on the prompt + rejected answer, each written as a LLaVA record (`pair_files`), so that every image,
role, marker and length rule holds for both continuations; what only a pair can get wrong (equal
answers, an empty one, a record of none of the shapes) is checked here, by name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from data.messages import content_text, load_messages_dataset, saved_images
from data.records import DataError, RawRecord, iter_records
from patches import dataset_fingerprint


@dataclass
class Pair:
    """One preference pair: `conversations` are LLaVA turns ending on the human question."""

    id: str
    image: list[str]
    conversations: list[dict]
    chosen: str
    rejected: str

    def as_llava(self, answer: str) -> dict:
        """The prompt and one of its answers as a LLaVA record, the input of the supervised check
        and of the inputs object's dataset."""
        return {"id": self.id, "image": self.image, "conversations": [*self.conversations, {"from": "gpt", "value": answer}]}


def _turns(messages) -> list[dict]:
    """A prompt given as a string or as chat messages -> LLaVA turns."""
    if isinstance(messages, str):
        return [{"from": "human", "value": messages}]
    return [{"from": m["role"], "value": content_text(m["content"], f"turn {k}")} for k, m in enumerate(messages)]


def _answer(value) -> str:
    """A chosen or rejected answer: a string, or TRL's list of (one) assistant message."""
    if isinstance(value, str):
        return value
    texts = [content_text(m["content"], "the answer") for m in value if m.get("role") == "assistant"]
    if len(texts) != 1:
        raise ValueError(f"an answer given as messages holds one assistant message, not {len(texts)}")
    return texts[0]


def _images(record: dict) -> list[str]:
    images = record.get("images", record.get("image"))
    if images is None:
        return []
    images = [images] if isinstance(images, str) else images
    if not (isinstance(images, list) and all(isinstance(i, str) for i in images)):
        raise TypeError(f"images are file names (relative to --image_folder), not {images!r}")
    return images


def _prompt_and_chosen(record: dict) -> tuple[list[dict], str]:
    if "question" in record:  # RLAIF-V
        return _turns(record["question"]), _answer(record["chosen"])
    if "prompt" in record:  # TRL
        return _turns(record["prompt"]), _answer(record["chosen"])
    turns = list(record["conversations"])  # LLaVA (as data/records.py reads it)
    if "chosen" in record:
        return turns, _answer(record["chosen"])
    if turns and turns[-1].get("from") in ("gpt", "assistant"):
        return turns[:-1], turns[-1]["value"]
    raise KeyError("chosen")


SHAPES = ("RLAIF-V's (image, question, chosen, rejected), TRL's (images, prompt, chosen, rejected) or "
          "LLaVA's (image, conversations, chosen, rejected)")


def as_pair(raw: RawRecord) -> tuple[Pair | None, str | None]:
    """The pair a record holds, or why it holds none (a reason naming the field and the fix)."""
    if raw.error is not None:
        return None, raw.error
    record = raw.record
    try:
        conversations, chosen = _prompt_and_chosen(record)
        rejected = _answer(record["rejected"])
        images = _images(record)
    except (KeyError, TypeError, ValueError, AttributeError, DataError) as e:
        return None, f"not a preference record ({type(e).__name__}: {e}): write it in {SHAPES}"
    if not chosen.strip() or not rejected.strip():
        empty = "chosen" if not chosen.strip() else "rejected"
        return None, f"the {empty} answer is empty: a pair needs two answers to prefer one of"
    if chosen.strip() == rejected.strip():
        return None, "chosen and rejected are the same answer: the pair teaches nothing (its loss is constant)"
    return Pair(raw.record_id or raw.location, images, conversations, chosen, rejected), None


@dataclass
class PairFiles:
    """The good pairs written as two LLaVA files, position k of each the same pair; `positions[k]`:
    that pair's position in the preference file; `problems`: (location, id, reason) of the others."""

    chosen: str
    rejected: str
    positions: list[int]
    problems: list[tuple[str, str | None, str]]


def pair_files(data_path: str, out_dir: str, write: bool = True) -> PairFiles:
    """Reads every preference record of `data_path`, writes the good pairs' chosen and rejected
    conversations to `out_dir`/chosen.jsonl and rejected.jsonl (deterministic: the data check's
    cache keeps working; `write=False`: the files another rank wrote), and lists the records
    that hold no usable pair."""
    files = PairFiles(os.path.join(out_dir, "chosen.jsonl"), os.path.join(out_dir, "rejected.jsonl"), [], [])
    lines: dict[str, list[str]] = {"chosen": [], "rejected": []}
    for raw in iter_records(data_path):
        pair, problem = as_pair(raw)
        if pair is None:
            files.problems.append((raw.location, raw.record_id, problem))
            continue
        lines["chosen"].append(json.dumps(pair.as_llava(pair.chosen)) + "\n")
        lines["rejected"].append(json.dumps(pair.as_llava(pair.rejected)) + "\n")
        files.positions.append(raw.position)
    if write:
        os.makedirs(out_dir, exist_ok=True)
        for half, path in (("chosen", files.chosen), ("rejected", files.rejected)):
            with open(path, "w") as f:
                f.writelines(lines[half])
    return files


def refuse_bad_pairs(files: PairFiles, data_path: str, skip_bad_samples: bool, output_dir: str | None) -> None:
    """Stops before step 1 on records that hold no usable pair, naming them, unless
    `skip_bad_samples` (then they are listed in OUTPUT_DIR/skipped_pairs.jsonl)."""
    if not files.problems:
        return
    named = [f"  {location}" + (f" (id {rid})" if rid else "") + f": {why}" for location, rid, why in files.problems]
    if not skip_bad_samples or not files.positions:
        more = f"\n  ... {len(named) - 20} more" if len(named) > 20 else ""
        fix = ("Fix those records, or pass --skip_bad_samples true to train on the other "
               f"{len(files.positions)} pairs." if files.positions else "No record holds a usable pair.")
        raise DataError(f"{data_path}: training does not start, these records hold no usable pair:\n"
                        + "\n".join(named[:20]) + more + "\n" + fix)
    print(f"Skipping {len(files.problems)} records that hold no usable pair:\n" + "\n".join(named[:10]))
    if output_dir:
        with open(os.path.join(output_dir, "skipped_pairs.jsonl"), "w") as f:
            f.writelines(json.dumps({"location": loc, "id": rid, "reason": why}) + "\n" for loc, rid, why in files.problems)


# What a pair row of a dataset may hold, of the three shapes; its images are written as files.
PAIR_FIELDS = ("question", "prompt", "conversations", "chosen", "rejected")


def _pair_row(row: dict, index: int, image_dir: str) -> dict:
    images = row.get("images", row.get("image"))
    images = [] if images is None else images if isinstance(images, list) else [images]
    record = {"id": str(row.get("id", row.get("idx", index))), **{k: row[k] for k in PAIR_FIELDS if k in row}}
    return {**record, "images": saved_images(images, index, image_dir)}


def use_preference_dataset(data_args, out_dir: str) -> None:
    """--stage dpo with --dataset_name (a hub id such as openbmb/RLAIF-V-Dataset, a save_to_disk
    folder, a .parquet file): its rows written once as a JSONL of pairs (keyed by the dataset's
    fingerprint), their images as PNG files beside it; --data_path and --image_folder then name
    them, and every later step reads the file as it reads a --data_path of pairs."""
    if not data_args.dataset_name:
        return
    dataset = load_messages_dataset(data_args.dataset_name, data_args.dataset_split)
    folder = os.path.join(out_dir, "preference_data", dataset_fingerprint(dataset))
    path = os.path.join(folder, "pairs.jsonl")
    if not os.path.isfile(path):
        os.makedirs(os.path.join(folder, "images"), exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(_pair_row(row, i, folder)) + "\n" for i, row in enumerate(dataset))
        os.replace(path + ".tmp", path)  # atomic: another rank never reads half a file
    data_args.data_path, data_args.image_folder, data_args.dataset_name = path, folder, None
