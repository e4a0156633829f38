"""data/prompt.py, the one prompt builder: label mask, `<image>` expansion, truncation, and the
train/inference prompts being the same tokens."""

from __future__ import annotations

import glob
import os

import pytest
from transformers import AutoTokenizer

from data.prompt import (
    IGNORE_INDEX,
    SampleTooLong,
    TemplateMismatch,
    llava_to_messages,
    split_supervised,
    tokenize_conversation,
    tokenize_prompt,
)
from model.vlm import IMAGE_TOKEN_INDEX

N_IMAGE = 7  # image tokens per image in these tests (any count works; the model decides it)
IMAGE = object()  # stands for one image block in the expected sequences below

THREE_TURNS = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "<image>\nWhat color are the shapes?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "What shape is shown?"},
    {"role": "assistant", "content": "circle"},
    {"role": "user", "content": "How many shapes are there?"},
    {"role": "assistant", "content": "2"},
]


def encode_atoms(tokenizer, atoms) -> tuple[list[int], list[int]]:
    """Expected (input_ids, labels), built by hand from (atom, supervised) pairs, where an atom
    is a special token written as itself, IMAGE, or plain text (encoded on its own)."""
    special = set(tokenizer.all_special_tokens)
    ids, labels = [], []
    for atom, supervised in atoms:
        if atom is IMAGE:
            piece = [IMAGE_TOKEN_INDEX] * N_IMAGE
        elif atom in special:
            piece = [tokenizer.convert_tokens_to_ids(atom)]
        else:
            piece = tokenizer(atom, add_special_tokens=False).input_ids
        ids += piece
        labels += piece if supervised else [IGNORE_INDEX] * len(piece)
    return ids, labels


def turn(role, *content, supervised_answer=False):
    """Atoms of one ChatML turn: <|im_start|>role\\n content <|im_end|>\\n. For an assistant turn
    only the header is unsupervised: the answer, its <|im_end|> and the newline after it learn."""
    header = [("<|im_start|>", False), (f"{role}\n", False)]
    body = [(c, supervised_answer) for c in content]
    return header + body + [("<|im_end|>", supervised_answer), ("\n", supervised_answer)]


def test_label_mask_token_by_token(tiny_tokenizer):
    atoms = (
        turn("system", "Answer in one word.")
        + turn("user", IMAGE, "\nWhat color are the shapes?")
        + turn("assistant", "red", supervised_answer=True)
        + turn("user", "What shape is shown?")
        + turn("assistant", "circle", supervised_answer=True)
        + turn("user", "How many shapes are there?")
        + turn("assistant", "2", supervised_answer=True)
    )
    expected_ids, expected_labels = encode_atoms(tiny_tokenizer, atoms)

    ids, labels = tokenize_conversation(tiny_tokenizer, THREE_TURNS, N_IMAGE, IMAGE_TOKEN_INDEX)

    assert ids == expected_ids
    assert labels == expected_labels
    # The same thing said plainly: what learns is the three answers, each with its end of turn.
    supervised = [t for t in labels if t != IGNORE_INDEX]
    assert tiny_tokenizer.decode(supervised) == "red<|im_end|>\ncircle<|im_end|>\n2<|im_end|>\n"
    assert supervised.count(tiny_tokenizer.eos_token_id) == 3
    # Every supervised label is the input token at the same position (the LLM shifts them).
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels, strict=True))


def test_template_renders_what_the_expected_atoms_assume(tiny_tokenizer):
    # Guards the hand-built expectation above against a change of the tiny chat template.
    text = tiny_tokenizer.apply_chat_template(THREE_TURNS[:3], tokenize=False)
    assert text == (
        "<|im_start|>system\nAnswer in one word.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat color are the shapes?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
    )


def test_supervised_pieces_are_the_answers(tiny_tokenizer):
    pieces = split_supervised(tiny_tokenizer, THREE_TURNS)
    assert [text for text, supervised in pieces if supervised] == [
        "red<|im_end|>\n",
        "circle<|im_end|>\n",
        "2<|im_end|>\n",
    ]
    assert "".join(text for text, _ in pieces) == tiny_tokenizer.apply_chat_template(THREE_TURNS, tokenize=False)


def image_blocks(ids) -> list[tuple[int, int]]:
    """(start, length) of each run of image tokens."""
    blocks, start = [], None
    for i, token in enumerate([*ids, None]):
        if token == IMAGE_TOKEN_INDEX and start is None:
            start = i
        elif token != IMAGE_TOKEN_INDEX and start is not None:
            blocks.append((start, i - start))
            start = None
    return blocks


def test_image_marker_expands_to_num_image_tokens_in_place(tiny_tokenizer):
    messages = [
        {"role": "user", "content": "<image>\nWhat shape is shown?"},
        {"role": "assistant", "content": "square"},
    ]
    ids, labels = tokenize_conversation(tiny_tokenizer, messages, N_IMAGE, IMAGE_TOKEN_INDEX)
    header, _ = encode_atoms(tiny_tokenizer, [("<|im_start|>", False), ("user\n", False)])
    assert image_blocks(ids) == [(len(header), N_IMAGE)]
    assert ids[: len(header)] == header
    assert all(labels[i] == IGNORE_INDEX for i in range(len(header), len(header) + N_IMAGE))
    # The text's own "<image>" token never reaches the model: only IMAGE_TOKEN_INDEX does.
    assert tiny_tokenizer.convert_tokens_to_ids("<image>") not in ids


def test_two_markers_give_two_blocks(tiny_tokenizer):
    messages = [
        {"role": "user", "content": "<image>\n<image>\nHow many shapes are there?"},
        {"role": "assistant", "content": "3"},
        {"role": "user", "content": "<image>\nWhat color are the shapes?"},
        {"role": "assistant", "content": "blue"},
    ]
    ids, _ = tokenize_conversation(tiny_tokenizer, messages, N_IMAGE, IMAGE_TOKEN_INDEX)
    expected, _ = encode_atoms(
        tiny_tokenizer,
        turn("user", IMAGE, "\n", IMAGE, "\nHow many shapes are there?")
        + turn("assistant", "3")
        + turn("user", IMAGE, "\nWhat color are the shapes?")
        + turn("assistant", "blue"),
    )
    assert ids == expected
    blocks = image_blocks(ids)
    assert len(blocks) == 3
    assert all(length == N_IMAGE for _, length in blocks)
    assert ids.count(IMAGE_TOKEN_INDEX) == 3 * N_IMAGE
    # The prompt at inference expands the same way.
    prompt = tokenize_prompt(tiny_tokenizer, messages[:1], N_IMAGE, IMAGE_TOKEN_INDEX)
    assert [length for _, length in image_blocks(prompt)] == [N_IMAGE, N_IMAGE]


ANSWER_AFTER_IMAGE = [
    {"role": "user", "content": "<image>\nWhat shape is shown?"},
    {"role": "assistant", "content": "circle circle circle circle"},
]
# A label before the image, so that the cut through the image is the only reason to refuse.
IMAGE_IN_SECOND_TURN = [
    {"role": "user", "content": "What color are the shapes?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "<image>\nWhat shape is shown?"},
    {"role": "assistant", "content": "circle"},
]


def test_truncation_cuts_the_text_tail_when_images_and_a_label_survive(tiny_tokenizer):
    full_ids, full_labels = tokenize_conversation(tiny_tokenizer, ANSWER_AFTER_IMAGE, N_IMAGE, IMAGE_TOKEN_INDEX)
    first_label = next(i for i, label in enumerate(full_labels) if label != IGNORE_INDEX)
    # Exactly one label survives: the smallest length that is allowed.
    ids, labels = tokenize_conversation(
        tiny_tokenizer, ANSWER_AFTER_IMAGE, N_IMAGE, IMAGE_TOKEN_INDEX, max_length=first_label + 1
    )
    assert ids == full_ids[: first_label + 1]
    assert labels == full_labels[: first_label + 1]
    assert ids.count(IMAGE_TOKEN_INDEX) == N_IMAGE
    assert sum(label != IGNORE_INDEX for label in labels) == 1
    # Long enough: untouched.
    assert tokenize_conversation(
        tiny_tokenizer, ANSWER_AFTER_IMAGE, N_IMAGE, IMAGE_TOKEN_INDEX, max_length=len(full_ids)
    ) == (full_ids, full_labels)


def test_truncation_that_leaves_no_label_raises(tiny_tokenizer):
    _, full_labels = tokenize_conversation(tiny_tokenizer, ANSWER_AFTER_IMAGE, N_IMAGE, IMAGE_TOKEN_INDEX)
    first_label = next(i for i, label in enumerate(full_labels) if label != IGNORE_INDEX)
    with pytest.raises(SampleTooLong):
        tokenize_conversation(
            tiny_tokenizer, ANSWER_AFTER_IMAGE, N_IMAGE, IMAGE_TOKEN_INDEX, max_length=first_label
        )


def test_truncation_through_image_tokens_raises(tiny_tokenizer):
    full_ids, full_labels = tokenize_conversation(
        tiny_tokenizer, IMAGE_IN_SECOND_TURN, N_IMAGE, IMAGE_TOKEN_INDEX
    )
    ((start, length),) = image_blocks(full_ids)
    assert any(label != IGNORE_INDEX for label in full_labels[:start])  # a label would survive
    # The whole image fits: allowed, even with nothing after it.
    ids, _ = tokenize_conversation(
        tiny_tokenizer, IMAGE_IN_SECOND_TURN, N_IMAGE, IMAGE_TOKEN_INDEX, max_length=start + length
    )
    assert ids == full_ids[: start + length]
    # One image token short: refused, a partial image would misalign every later image.
    with pytest.raises(SampleTooLong):
        tokenize_conversation(
            tiny_tokenizer, IMAGE_IN_SECOND_TURN, N_IMAGE, IMAGE_TOKEN_INDEX, max_length=start + length - 1
        )
    with pytest.raises(SampleTooLong):
        tokenize_conversation(
            tiny_tokenizer, IMAGE_IN_SECOND_TURN, N_IMAGE, IMAGE_TOKEN_INDEX, max_length=start + 1
        )


def test_inference_prompt_is_the_training_prefix_up_to_each_answer(tiny_tokenizer):
    ids, labels = tokenize_conversation(tiny_tokenizer, THREE_TURNS, N_IMAGE, IMAGE_TOKEN_INDEX)
    answer_turns = [k for k, m in enumerate(THREE_TURNS) if m["role"] == "assistant"]
    assert len(answer_turns) == 3
    starts = []
    for k in answer_turns:
        prompt = tokenize_prompt(tiny_tokenizer, THREE_TURNS[:k], N_IMAGE, IMAGE_TOKEN_INDEX)
        assert ids[: len(prompt)] == prompt
        # The answer starts exactly where the prompt ends.
        assert labels[len(prompt) - 1] == IGNORE_INDEX
        assert labels[len(prompt)] == ids[len(prompt)] != IGNORE_INDEX
        answer = THREE_TURNS[k]["content"] + "<|im_end|>"
        assert tiny_tokenizer.decode(ids[len(prompt) :]).startswith(answer)
        starts.append(len(prompt))
    assert starts == sorted(starts)


def test_prompt_ends_with_the_generation_prompt(tiny_tokenizer):
    prompt = tokenize_prompt(tiny_tokenizer, THREE_TURNS[:2], N_IMAGE, IMAGE_TOKEN_INDEX)
    tail, _ = encode_atoms(tiny_tokenizer, [("<|im_start|>", False), ("assistant\n", False)])
    assert prompt[-len(tail) :] == tail


@pytest.mark.parametrize(
    "template",
    [
        pytest.param(
            # Renders the turn count first: the first k turns are not a prefix of the whole.
            "{{ messages|length }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            id="turn-count-header",
        ),
        pytest.param(
            # The generation prompt differs from how an assistant turn starts in training.
            "{% for m in messages %}<|im_start|>{{ m['role'] }}:\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            id="generation-prompt-differs",
        ),
    ],
)
def test_template_that_is_not_prefix_stable_raises(tiny_base, template):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base["llm"])  # a copy: the shared one stays intact
    tokenizer.chat_template = template
    with pytest.raises(TemplateMismatch):
        tokenize_conversation(tokenizer, THREE_TURNS, N_IMAGE, IMAGE_TOKEN_INDEX)


def test_llava_records_become_chat_messages():
    record = [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "<image>\nWhat shape is shown?"},
        {"from": "gpt", "value": "circle"},
    ]
    assert llava_to_messages(record) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>\nWhat shape is shown?"},
        {"role": "assistant", "content": "circle"},
    ]


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_TEMPLATES = sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "**", "*.jinja"), recursive=True))


def test_shipped_templates_are_found():
    assert any(path.endswith("vicuna_v1.jinja") for path in SHIPPED_TEMPLATES)


@pytest.mark.parametrize("path", SHIPPED_TEMPLATES, ids=os.path.basename)
def test_shipped_chat_templates_are_prefix_stable(tiny_base, path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base["llm"])  # a copy: the shared one stays intact
    with open(path) as f:
        tokenizer.chat_template = f.read()
    ids, labels = tokenize_conversation(tokenizer, THREE_TURNS, N_IMAGE, IMAGE_TOKEN_INDEX)
    # What learns is each answer and the template's end of turn, nothing of the prompts.
    supervised = [text for text, learns in split_supervised(tokenizer, THREE_TURNS) if learns]
    answers = [m["content"] for m in THREE_TURNS if m["role"] == "assistant"]
    assert len(supervised) == len(answers)
    # A template written for one family's processor ends a turn with that family's token.
    end_of_turn = {"paligemma.jinja": "<eos>"}.get(os.path.basename(path), tokenizer.eos_token)
    for text, answer in zip(supervised, answers, strict=True):
        assert text.strip().startswith(answer)
        assert end_of_turn in text
        assert "USER" not in text and "user" not in text
    assert ids.count(IMAGE_TOKEN_INDEX) == N_IMAGE
    for k, message in enumerate(THREE_TURNS):
        if message["role"] == "assistant":
            prompt = tokenize_prompt(tokenizer, THREE_TURNS[:k], N_IMAGE, IMAGE_TOKEN_INDEX)
            assert ids[: len(prompt)] == prompt
            assert labels[len(prompt) - 1] == IGNORE_INDEX != labels[len(prompt)]
