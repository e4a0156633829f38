"""The demo set: coloured shapes on a plain background, with questions about colour, shape,
position and count, in LLaVA's format. Small enough to learn in about a minute on a CPU."""

from __future__ import annotations

import json
import os
import random

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = {
    "color": "What color are the shapes?",
    "shape": "What shape is shown?",
    "count": "How many shapes are there?",
    "position": "Is the shape at the top or the bottom?",
}
SIZE = 48  # the tiny tower's image_size


def vocabulary() -> list[str]:
    """Text the demo uses: the tiny tokenizer is trained on it, so its words are single tokens."""
    words = list(COLORS) + list(SHAPES) + ["1", "2", "3", "top", "bottom"]
    return list(QUESTIONS.values()) + words + ["<image>\n" + q for q in QUESTIONS.values()]


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, r: int, fill) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def make_image(rng: random.Random) -> tuple[Image.Image, dict]:
    color, shape, count = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.randint(1, 3)
    image = Image.new("RGB", (SIZE, SIZE), tuple(rng.randint(225, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    radius = SIZE // 5
    if count == 1:
        # Top/bottom rather than left/right: image tokens are flattened row by row, so "top" is
        # "early in the sequence", which a tiny LLM learns in seconds; left/right would ask it
        # to read positions modulo the grid width.
        side = rng.choice(["top", "bottom"])
        low, high = (radius, SIZE // 2 - radius) if side == "top" else (SIZE // 2 + radius, SIZE - radius - 1)
        centers = [(rng.randint(radius, SIZE - radius - 1), rng.randint(low, high))]
    else:
        side = None
        quarter = SIZE // 4
        cells = rng.sample([(x, y) for x in (quarter, 3 * quarter) for y in (quarter, 3 * quarter)], count)
        centers = [(x + rng.randint(-2, 2), y + rng.randint(-2, 2)) for x, y in cells]  # 2x2 grid
    for cx, cy in centers:
        _draw(draw, shape, cx, cy, radius, COLORS[color])
    return image, {"color": color, "shape": shape, "count": str(count), "position": side}


def make_record(rng: random.Random, record_id: str, image_name: str, facts: dict, max_turns: int) -> dict:
    kinds = [k for k in QUESTIONS if facts[k] is not None]
    rng.shuffle(kinds)
    conversations = []
    for turn, kind in enumerate(kinds[: rng.randint(1, max_turns)]):
        question = ("<image>\n" if turn == 0 else "") + QUESTIONS[kind]
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": facts[kind]}]
    return {"id": record_id, "image": image_name, "conversations": conversations}


def make_demo_dataset(out_dir: str, train_size: int, eval_size: int, seed: int = 0) -> dict:
    """Writes images and `train.json` (1-2 turns per record) / `eval.json` (one question each)."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    paths = {}
    for split, size, max_turns in (("train", train_size, 2), ("eval", eval_size, 1)):
        records = []
        for i in range(size):
            image, facts = make_image(rng)
            name = f"images/{split}-{i:05d}.png"
            image.save(os.path.join(out_dir, name))
            records.append(make_record(rng, f"{split}-{i:05d}", name, facts, max_turns))
        paths[split] = os.path.join(out_dir, f"{split}.json")
        with open(paths[split], "w") as f:
            json.dump(records, f, indent=1)
    return paths
