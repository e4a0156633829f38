"""The one prompt builder: chat template + `<image>` expansion + label mask.

Training, inference and evaluation all build token ids here, so a prompt is never built two
ways. Conversations are lists of {"role": "user" | "assistant" | "system", "content": str}.
"""

from __future__ import annotations

from constants import IGNORE_INDEX
from data.template_shapes import ShapeRenders, render_template
from errors import UserError

IMAGE_MARKER = "<image>"
VIDEO_MARKER = "<video>"  # a video's sampled frames, one <image> each, in time order
# LLaVA's speaker names, and the chat names some converted sets use instead.
LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


class TemplateMismatch(UserError):
    """The chat template does not render a conversation as a prefix-stable sequence of turns, so
    assistant tokens cannot be located (LLaVA's silent "tokenization mismatch", loss 0)."""


class SampleTooLong(UserError):
    """The sample does not fit `max_length` without cutting image tokens or every label."""


# More samples than this without a single supervised token is a template problem, not data.
MAX_FULLY_MASKED_SHARE = 0.5


def check_fully_masked_share(num_fully_masked: int, num_samples: int) -> None:
    """LLaVA's "tokenization mismatch" trains at loss 0 on every label masked; here a data set
    where most samples would learn nothing is refused before step 1."""
    if num_samples and num_fully_masked / num_samples > MAX_FULLY_MASKED_SHARE:
        raise TemplateMismatch(
            f"{num_fully_masked} of {num_samples} samples have no supervised token (every label "
            "-100): the chat template renders no assistant text where the prompt builder looks "
            "for it, so training would run at loss 0. Check the tokenizer's chat template or "
            "--chat_template: it must render each assistant turn's content after the generation "
            "prompt (add_generation_prompt=True)."
        )


def _prepend_to_first_user_turn(messages: list[dict], text: str) -> list[dict]:
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first_user is None:
        return messages
    messages = [dict(m) for m in messages]
    messages[first_user]["content"] = text + messages[first_user]["content"]
    return messages


def add_image_markers(messages: list[dict], num_images: int) -> list[dict]:
    """The rule for images given without any `<image>` marker (as LLaVA does): one `<image>\n`
    per image goes before the first user turn's text. Training, inference and evaluation all
    come through here, so such a record is read the same way everywhere. A record that has
    markers, but not one per image, is not guessed at: validation reports it."""
    if num_images == 0 or any(IMAGE_MARKER in m["content"] for m in messages):
        return messages
    return _prepend_to_first_user_turn(messages, (IMAGE_MARKER + "\n") * num_images)


def expand_video_marker(messages: list[dict], num_frames: int) -> list[dict]:
    """`<video>` -> one `<image>` per sampled frame; with no `<video>` marker, `<video>\n` goes
    before the first user turn's text (the image rule, for a video)."""
    if not any(VIDEO_MARKER in m["content"] for m in messages):
        messages = _prepend_to_first_user_turn(messages, VIDEO_MARKER + "\n")
    frames = IMAGE_MARKER * num_frames
    return [{**m, "content": m["content"].replace(VIDEO_MARKER, frames)} for m in messages]


class MarkerMismatch(UserError):
    """A typed question's `<image>` markers are not one per image."""

    def __init__(self, markers: int, num_images: int):
        self.markers, self.num_images = markers, num_images
        super().__init__(
            f"{markers} {IMAGE_MARKER} markers for {num_images} images: give one marker per image, in the "
            f"images' order, or none and one '{IMAGE_MARKER}\\n' per image goes before the question."
        )


def question_messages(question: str, num_images: int, video: bool = False) -> list[dict]:
    """A typed question and its `num_images` images -> the user turn to answer; infer.py's
    --prompt and the web page's typed question both come through here. `video`: the images are a
    video's frames, in time order (`expand_video_marker`); else images without markers go before
    the question (`add_image_markers`). Markers that are not one per image raise `MarkerMismatch`."""
    messages = [{"role": "user", "content": question}]
    if video:
        messages = expand_video_marker(messages, num_images)
    else:
        messages = add_image_markers(messages, num_images)
    markers = messages[0]["content"].count(IMAGE_MARKER)
    if markers != num_images:
        raise MarkerMismatch(markers, num_images)
    return messages


def llava_to_messages(conversations: list[dict], num_images: int = 0, num_frames: int = 0) -> list[dict]:
    """LLaVA's [{"from": "human" | "gpt", "value": ...}] -> chat messages. A record's images
    without markers get them (`add_image_markers`); a video record's `<video>` becomes its
    `num_frames` frames (`expand_video_marker`)."""
    messages = [{"role": LLAVA_ROLES[turn["from"]], "content": turn["value"]} for turn in conversations]
    if num_frames:
        return expand_video_marker(messages, num_frames)
    return add_image_markers(messages, num_images)


# The probe turns that show what a template writes around an answer (`turn_end_text`), and before
# the question of the turn after one (`_next_turn_marker`).
PROBE_QUESTION, PROBE_ANSWER = "Probe question?", "42"


def split_supervised(
    tokenizer, messages: list[dict], add_generation_prompt: bool = False, render=render_template
) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, supervised) pieces. An assistant piece is what the
    template adds for that turn after the generation prompt: the answer and its end of turn, the
    token the model must generate to stop. Where the template writes nothing after an answer
    (GLM-4V style: the next role marker ends the turn), the end of turn is that marker: supervised
    where the next turn writes it, and appended after the last answer, so that every answer learns
    to stop. Pieces are tokenized one by one, so a prompt at inference splits exactly as in training.
    `render`: `render_template`, or a batch's `ShapeRenders` where it fits (data/template_shapes.py)."""
    full = render(tokenizer, messages, add_generation_prompt)
    pieces, done = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
        through = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(through) and through.startswith(prompt) and len(prompt) >= done):
            raise TemplateMismatch(
                f"The chat template does not render turn {i} as a prefix of the conversation, so "
                "its answer tokens cannot be located. Use a template whose rendering of the first "
                "k turns is a prefix of the whole (pass --chat_template FILE.jinja)."
            )
        pieces.append((full[done : len(prompt)], False))
        answer, done = full[len(prompt) : len(through)], len(through)
        if _writes_no_turn_end(answer, message["content"]):
            marker = _next_turn_marker(tokenizer, messages[: i + 1], through, render)
            if i + 1 == len(messages):
                answer += marker  # not in `full`: the conversation ends here
            elif full.startswith(marker, done):
                answer, done = answer + marker, done + len(marker)
        pieces.append((answer, True))
    pieces.append((full[done:], False))
    return [(text, supervised) for text, supervised in pieces if text]
def _writes_no_turn_end(answer_piece: str, content: str) -> bool:
    """Whether the template writes nothing but whitespace after this answer."""
    return answer_piece.rstrip().endswith(content.strip())


def _first_word(text: str) -> str:
    """`text` through its first non-blank run: "\n<|user|>\n" -> "\n<|user|>"."""
    stripped = text.lstrip()
    word = stripped.split(maxsplit=1)[0] if stripped else ""
    return text[: len(text) - len(stripped) + len(word)]


def _next_turn_marker(tokenizer, messages: list[dict], rendered: str, render=render_template) -> str:
    """What the template writes after `messages` (rendered as `rendered`) to open a user turn, through
    its first word ("<|user|>", "USER:"); the tokenizer's eos where it writes nothing there."""
    following = render(tokenizer, [*messages, {"role": "user", "content": PROBE_QUESTION}], False)
    opening = following[len(rendered) :].split(PROBE_QUESTION, 1)[0]
    return _first_word(opening) if opening.strip() else tokenizer.eos_token or ""


def _probe_answer(tokenizer) -> tuple[str, int]:
    """(the supervised piece of a probe answer, where the answer itself ends in it)."""
    probe = [{"role": "user", "content": PROBE_QUESTION}, {"role": "assistant", "content": PROBE_ANSWER}]
    piece = next(text for text, supervised in split_supervised(tokenizer, probe) if supervised)
    return piece, piece.rindex(PROBE_ANSWER) + len(PROBE_ANSWER)


def turn_end_text(tokenizer) -> str:
    """The text that ends an assistant turn in the tokenizer's template, as training supervises it:
    the first word the template writes after an answer ("<|im_end|>", "</s>", "<end_of_turn>"), or
    where it writes none, the marker that opens the next turn ("<|user|>"). Its first token is the
    stop id the label rule trains (`turn_end_id`)."""
    piece, end = _probe_answer(tokenizer)
    return _first_word(piece[end:]).strip()


def turn_end_id(tokenizer) -> int:
    """The token that ends an assistant turn: the one at `turn_end_text`'s first character, tokenized
    in place after an answer as the label rule tokenizes it (a word marker may take the space before it)."""
    piece, end = _probe_answer(tokenizer)
    start = len(piece) - len(piece[end:].lstrip())
    encoded = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
    return next(t for t, (_, stop) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True) if stop > start)


def _encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text's ids as `tokenizer(text, add_special_tokens=False)` gives them, by a fast
    tokenizer's own batch encoder where it has one (~15% faster: no Python objects per text),
    the variant that skips character offsets (nothing here reads them: ~17% faster again,
    docs/data.md)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(texts, add_special_tokens=False).input_ids
    return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]


def _encode_pieces(tokenizer, conversations: list[list[tuple[str, bool]]], num_image_tokens: int,
                   image_token_index: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each conversation's (text, supervised) pieces, every text between
    `<image>` markers tokenized on its own, all in ONE tokenizer call (a call's overhead is most
    of a short text's cost); each `<image>` is `num_image_tokens` copies of `image_token_index`."""
    chunks = [[text.split(IMAGE_MARKER) for text, _ in pieces] for pieces in conversations]
    texts = [chunk for pieces in chunks for piece in pieces for chunk in piece if chunk]
    encoded = iter(_encode_texts(tokenizer, texts) if texts else [])
    out = []
    for pieces, piece_chunks in zip(conversations, chunks, strict=True):
        input_ids: list[int] = []
        labels: list[int] = []
        for (_, supervised), piece in zip(pieces, piece_chunks, strict=True):
            ids: list[int] = []
            for k, chunk in enumerate(piece):
                if k:
                    ids += [image_token_index] * num_image_tokens
                if chunk:
                    ids += next(encoded)
            input_ids += ids
            labels += ids if supervised else [IGNORE_INDEX] * len(ids)
        out.append((input_ids, labels))
    return out


def tokenize_conversations(
    tokenizer,
    conversations: list[list[dict]],
    num_image_tokens: int,
    image_token_index: int,
    max_length: int | None = None,
) -> list[tuple[list[int], list[int]] | UserError]:
    """`tokenize_conversation` of many conversations at once (one tokenizer call): per
    conversation its (input_ids, labels), or the `TemplateMismatch` / `SampleTooLong` it raised."""
    results: list = [None] * len(conversations)
    split, shapes = {}, ShapeRenders()  # the template rendered once per shape of the batch's conversations
    for k, messages in enumerate(conversations):
        try:
            render = shapes if shapes.fits(tokenizer, messages) else render_template
            split[k] = split_supervised(tokenizer, messages, render=render)
        except TemplateMismatch as e:
            results[k] = e
    encoded = _encode_pieces(tokenizer, list(split.values()), num_image_tokens, image_token_index)
    for k, (ids, labels) in zip(split, encoded, strict=True):
        try:
            results[k] = fit_length(ids, labels, image_token_index, max_length)
        except SampleTooLong as e:
            results[k] = e
    return results


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
    (result,) = tokenize_conversations(tokenizer, [messages], num_image_tokens, image_token_index, max_length)
    if isinstance(result, UserError):
        raise result
    return result


def fit_length(input_ids: list[int], labels: list[int], image_token_index: int, max_length: int | None):
    """(input_ids, labels) cut to `max_length` if every image token and at least one label
    survive; otherwise `SampleTooLong`."""
    if max_length is None or len(input_ids) <= max_length:
        return input_ids, labels
    last_image = max((i for i, t in enumerate(input_ids) if t == image_token_index), default=-1)
    if last_image >= max_length or all(label == IGNORE_INDEX for label in labels[:max_length]):
        raise SampleTooLong(f"{len(input_ids)} tokens (image tokens included) > --max_length {max_length}.")
    return input_ids[:max_length], labels[:max_length]


def tokenize_prompt(tokenizer, messages: list[dict], num_image_tokens: int, image_token_index: int) -> list[int]:
    """Token ids of a prompt awaiting the assistant's answer (the generation prompt appended)."""
    pieces = split_supervised(tokenizer, messages, add_generation_prompt=True)
    ((ids, _),) = _encode_pieces(tokenizer, [pieces], num_image_tokens, image_token_index)
    return ids
