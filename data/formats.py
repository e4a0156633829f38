"""Records as other projects write them, read as LLaVA's where the file is read
(`data/records.py`), so validation, training, evaluation and inference all see one shape.

MiniCPM-V's fine-tuning format (its finetune README):

    {"id": "0", "image": "a.jpg" or {"<image_00>": "a.jpg", "<image_01>": "b.jpg"},
     "conversations": [{"role": "user", "content": "...\\n<image_00>\\n...\\n<image_01>\\n..."},
                       {"role": "assistant", "content": "..."}]}

Turns `{"role", "content"}` become `{"from", "value"}` (`LLAVA_ROLES` knows the chat names). A
dict of images names a placeholder for each: every placeholder in the text becomes `<image>`,
and the images are listed in the order their placeholders appear, the order the model sees
them in. A placeholder that would otherwise stay in the prompt as words beside the image
tokens is a data error naming it: one that is not a key, a key the text never uses, or any
`<image_NN>` in a record whose images are a plain name or list (what a hand conversion leaves).
"""

from __future__ import annotations

import re

from data.prompt import IMAGE_MARKER

# MiniCPM-V's placeholders. Outside a dict of images nothing replaces them: left in the text,
# the model would read "<image_00>" next to the image tokens it stands for.
PLACEHOLDER = re.compile(r"<image_\d+>")

ReadProblem = tuple[str, str]  # (kind, reason): a kind of data/validate.py's SEVERITY


def _is_chat_turn(turn) -> bool:
    return isinstance(turn, dict) and "role" in turn and "content" in turn and "from" not in turn


def _texts(turns) -> list[tuple[int, str]]:
    """(turn index, text) of each turn whose text can be read; validation names the others."""
    if not isinstance(turns, list):
        return []
    return [(k, t["value"]) for k, t in enumerate(turns) if isinstance(t, dict) and isinstance(t.get("value"), str)]


def as_llava_record(record: dict) -> tuple[dict, ReadProblem | None]:
    """`record` in LLaVA's shape (a new dict when anything changes), and the problem, if any,
    that keeps it from being trained on."""
    turns = record.get("conversations")
    if isinstance(turns, list) and any(_is_chat_turn(t) for t in turns):
        turns = [{"from": t["role"], "value": t["content"]} if _is_chat_turn(t) else t for t in turns]
        record = {**record, "conversations": turns}
    images = record.get("image")
    if isinstance(images, dict):
        return _place_images(record, images)
    return record, None if images is None else _leftover_placeholder(turns)


def _leftover_placeholder(turns) -> ReadProblem | None:
    for k, text in _texts(turns):
        found = PLACEHOLDER.search(text)
        if found:
            return "image_placeholder", (
                f"turn {k} holds the placeholder {found.group()!r} but 'image' is a plain file name or "
                "list, so it would stay in the prompt as text beside the image tokens. Write "
                f"{IMAGE_MARKER} for each image instead, in the order of the 'image' list, or give "
                f"'image' as MiniCPM-V's dict {{{found.group()!r}: 'file.jpg', ...}}"
            )
    return None


def _place_images(record: dict, images: dict) -> tuple[dict, ReadProblem | None]:
    """MiniCPM-V's dict of images: each placeholder -> `<image>`, the images in that order."""
    if not images or not all(isinstance(k, str) and k and isinstance(v, str) for k, v in images.items()):
        return record, ("bad_record", "'image' as a dict maps each placeholder in the text to a file "
                                      f"name, as {{'<image_00>': 'a.jpg'}}; not {images!r}")
    if not isinstance(record.get("conversations"), list):
        return record, ("bad_record", "no 'conversations' list of turns")
    # Keys before the look-alike pattern, longest first: at any position the longest key wins.
    keys = sorted(images, key=len, reverse=True)
    pattern = re.compile("|".join(map(re.escape, keys)) + "|" + PLACEHOLDER.pattern)
    turns = list(record["conversations"])
    placed: list[str] = []
    for k, text in _texts(turns):
        for match in pattern.finditer(text):
            if match.group() not in images:
                return record, ("image_placeholder", (
                    f"turn {k} holds the placeholder {match.group()!r}, which is not a key of 'image' "
                    f"({', '.join(images)}): name its file in 'image', or take it out of the text"
                ))
            placed.append(match.group())
        turns[k] = {**turns[k], "value": pattern.sub(IMAGE_MARKER, text)}
    unused = [key for key in images if key not in placed]
    if unused:
        return record, ("image_placeholder", (
            f"the placeholder {unused[0]!r} of 'image' ({images[unused[0]]}) appears in no turn, so "
            "its image has no place in the prompt: put it in the text where the image belongs, or "
            "leave it out of 'image'"
        ))
    return {**record, "image": [images[key] for key in placed], "conversations": turns}, None
