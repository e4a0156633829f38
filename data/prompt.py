"""The one prompt builder: chat template + `<image>` expansion + label mask.

Training, inference and evaluation all build token ids here, so a prompt is never built two
ways. Conversations are lists of {"role": "user" | "assistant" | "system", "content": str}.
"""

from __future__ import annotations

IMAGE_MARKER = "<image>"
IGNORE_INDEX = -100
LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


class TemplateMismatch(ValueError):
    """The chat template does not render a conversation as a prefix-stable sequence of turns, so
    assistant tokens cannot be located (LLaVA's silent "tokenization mismatch", loss 0)."""


class SampleTooLong(ValueError):
    """The sample does not fit `max_length` without cutting image tokens or every label."""


def llava_to_messages(conversations: list[dict]) -> list[dict]:
    """LLaVA's [{"from": "human" | "gpt", "value": ...}] -> chat messages."""
    return [{"role": LLAVA_ROLES[turn["from"]], "content": turn["value"]} for turn in conversations]


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def split_supervised(
    tokenizer, messages: list[dict], add_generation_prompt: bool = False
) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, supervised) pieces. An assistant piece is what the
    template adds for that turn after the generation prompt: the answer and its end-of-turn.
    Pieces are tokenized one by one, so a prompt at inference splits exactly as in training."""
    full = _render(tokenizer, messages, add_generation_prompt)
    pieces, done = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(through) and through.startswith(prompt) and len(prompt) >= done):
            raise TemplateMismatch(
                f"The chat template does not render turn {i} as a prefix of the conversation, so "
                "its answer tokens cannot be located. Use a template whose rendering of the first "
                "k turns is a prefix of the whole (pass --chat_template FILE.jinja)."
            )
        pieces += [(full[done : len(prompt)], False), (full[len(prompt) : len(through)], True)]
        done = len(through)
    pieces.append((full[done:], False))
    return [(text, supervised) for text, supervised in pieces if text]


def _tokenize_piece(tokenizer, text: str, num_image_tokens: int, image_token_index: int) -> list[int]:
    ids: list[int] = []
    for k, chunk in enumerate(text.split(IMAGE_MARKER)):
        if k:
            ids += [image_token_index] * num_image_tokens
        if chunk:
            ids += tokenizer(chunk, add_special_tokens=False).input_ids
    return ids


def tokenize_conversation(
    tokenizer,
    messages: list[dict],
    num_image_tokens: int,
    image_token_index: int,
    max_length: int | None = None,
) -> tuple[list[int], list[int]]:
    """(input_ids, labels). Labels are -100 except on assistant tokens; every `<image>` becomes
    `num_image_tokens` copies of `image_token_index`.

    Too long: the tail is cut only if every image token and at least one label survive;
    otherwise `SampleTooLong` is raised and the caller drops the sample.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    for text, supervised in split_supervised(tokenizer, messages):
        ids = _tokenize_piece(tokenizer, text, num_image_tokens, image_token_index)
        input_ids += ids
        labels += ids if supervised else [IGNORE_INDEX] * len(ids)
    if max_length is not None and len(input_ids) > max_length:
        last_image = max((i for i, t in enumerate(input_ids) if t == image_token_index), default=-1)
        if last_image >= max_length or all(label == IGNORE_INDEX for label in labels[:max_length]):
            raise SampleTooLong(
                f"{len(input_ids)} tokens (image tokens included) > --max_length {max_length}."
            )
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return input_ids, labels


def tokenize_prompt(tokenizer, messages: list[dict], num_image_tokens: int, image_token_index: int) -> list[int]:
    """Token ids of a prompt awaiting the assistant's answer (the generation prompt appended)."""
    ids: list[int] = []
    for text, _ in split_supervised(tokenizer, messages, add_generation_prompt=True):
        ids += _tokenize_piece(tokenizer, text, num_image_tokens, image_token_index)
    return ids
