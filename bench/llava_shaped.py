"""A seeded data set shaped like LLaVA-1.5's 665K instruction mix, at any size: one JSON list,
3.2 question-answer turns per record on average, answers of 1-400 words (most a few words, as
VQA's; the rest long, as the conversation and detail sets), 6% text-only, images drawn from a
pool of 640 x 480 JPEGs. Nothing is downloaded.

    python -m bench.llava_shaped --records 200000 --out /tmp/llava200k
"""

from __future__ import annotations

import argparse
import json
import os
import random

from PIL import Image, ImageDraw

NUM_IMAGES = 2_000
TEXT_ONLY_SHARE = 0.06
SHORT_ANSWER_SHARE = 0.6  # VQA-style answers of 1-5 words; the rest 20-400 words
# 1..8 turns, weights giving a mean of 3.2 turns per record
TURN_WEIGHTS = [20, 23, 20, 13, 10, 7, 4, 3]
# Words the tiny base's tokenizer encodes in one or two tokens (its BPE knows little more than
# the demo's words): ~1.5 tokens a word, as a real LLM's tokenizer on English (~1.3), so that a
# record here is as many tokens as its words would be in LLaVA's own set.
WORDS = (
    "the a to is as are at an or there image man red blue green yellow top bottom shows many "
    "what how shape shapes shown square circle triangle color 1 2 3"
).split()


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def _answer(rng: random.Random) -> str:
    if rng.random() < SHORT_ANSWER_SHARE:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5))).capitalize()
    total, parts = rng.randint(20, 400), []
    while total > 0:
        n = min(total, rng.randint(8, 20))
        parts.append(_sentence(rng, n))
        total -= n
    return " ".join(parts)


def make_record(rng: random.Random, index: int) -> dict:
    turns = rng.choices(range(1, len(TURN_WEIGHTS) + 1), weights=TURN_WEIGHTS)[0]
    conversations = []
    for _ in range(turns):
        question = _sentence(rng, rng.randint(5, 15)).rstrip(".") + "?"
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": _answer(rng)}]
    record = {"id": f"{index:09d}", "conversations": conversations}
    if rng.random() >= TEXT_ONLY_SHARE:
        record["image"] = f"coco/{rng.randrange(NUM_IMAGES):06d}.jpg"
        conversations[0]["value"] = "<image>\n" + conversations[0]["value"]
    return record


def make_images(folder: str, seed: int) -> None:
    os.makedirs(os.path.join(folder, "coco"), exist_ok=True)
    rng = random.Random(seed)
    for k in range(NUM_IMAGES):
        path = os.path.join(folder, "coco", f"{k:06d}.jpg")
        if os.path.isfile(path):
            continue
        image = Image.new("RGB", (640, 480), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = rng.randrange(600), rng.randrange(440)
            draw.rectangle((x, y, x + rng.randrange(40, 200), y + rng.randrange(40, 200)),
                           fill=tuple(rng.randrange(256) for _ in range(3)))
        image.save(path, quality=85)


def make_llava_shaped(folder: str, records: int, seed: int = 0) -> str:
    """Writes `folder/train_<records>.json` (once) and the image pool under `folder/coco`; returns
    the file's path. Streams the list out: a 665K-record set never sits in memory."""
    make_images(folder, seed)
    path = os.path.join(folder, f"train_{records}.json")
    if os.path.isfile(path):
        return path
    rng = random.Random(seed)
    with open(path + ".tmp", "w") as f:
        f.write("[\n")
        for index in range(records):
            f.write(("," if index else "") + json.dumps(make_record(rng, index)) + "\n")
        f.write("]\n")
    os.replace(path + ".tmp", path)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--out", default="outputs/llava-shaped")
    args = parser.parse_args()
    print(make_llava_shaped(args.out, args.records))
