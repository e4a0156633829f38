"""The tiny released-VLM families (fixtures/tiny_vlms.py) load through the Auto classes from their
folder, render chat templates prefix-stably, train (finite loss, gradients) and generate."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import PARTS, part_of
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from fixtures.tiny_vlms import FAMILIES, make_tiny_vlm

# What each family's template renders for an image part.
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
PLACEHOLDER = {
    "llava": "<image>", "llava_next": "<image>", "llava_onevision": "<image>", "mistral3": "[IMG]",
    "qwen2_5_vl": QWEN_IMAGE, "qwen3_vl": QWEN_IMAGE, "qwen3_5": QWEN_IMAGE,
    "glm4v": "<|begin_of_image|><|image|><|end_of_image|>",
    "paligemma": "<image>", "gemma3": "<start_of_image>", "gemma4": "<image_soft_token>",
    "smolvlm": "<image>", "idefics3": "<image>", "lfm2_vl": "<image>", "internvl": "<IMG_CONTEXT>\n",
    "minicpmv4_6": "<|image_pad|>", "minicpmv4_7": "<|image_pad|>",
}
# Image tokens (config.image_token_id) a 48x48 image expands to: anyres adds a tile and its row ends;
# Gemma 4 resizes an image to its soft-token budget.
IMAGE_TOKENS = {
    "llava": 16, "llava_next": 36, "llava_onevision": 36, "mistral3": 9,
    "qwen2_5_vl": 9, "qwen3_vl": 9, "qwen3_5": 9, "glm4v": 9,
    "paligemma": 16, "gemma3": 4, "gemma4": 64,
    "smolvlm": 9, "idefics3": 9, "lfm2_vl": 9, "internvl": 9, "minicpmv4_6": 9, "minicpmv4_7": 9,
}
CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color are the shapes?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    {"role": "user", "content": "What shape is shown?"},  # string content
    {"role": "assistant", "content": "circle"},
]


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
    """`tiny_vlm(family, seed=0)` -> folder, built once per (family, seed) in this session."""
    root = tmp_path_factory.mktemp("tiny_vlms")
    return lambda family, seed=0: make_tiny_vlm(family, str(root / f"{family}-{seed}"), seed=seed)


@pytest.fixture(scope="module")
def image():
    img = Image.new("RGB", (48, 48), (240, 240, 240))
    img.paste((220, 40, 40), (12, 12, 36, 36))
    return img


def load(folder):
    return AutoModelForImageTextToText.from_pretrained(folder), AutoProcessor.from_pretrained(folder)


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_trains_and_generates(family, tiny_vlm, image):
    model, processor = load(tiny_vlm(family))
    assert model.config.model_type == family
    assert next(model.parameters()).dtype == torch.float32

    text = processor.apply_chat_template(CONVERSATION, tokenize=False)
    assert text.count(PLACEHOLDER[family]) == 1
    inputs = processor(text=[text], images=[[image]], return_tensors="pt")
    inputs.pop("labels", None)  # PaliGemma's processor returns labels (all -100 without suffix=)
    assert (inputs["input_ids"] == model.config.image_token_id).sum().item() == IMAGE_TOKENS[family]

    model.train()
    out = model(**inputs, labels=inputs["input_ids"])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    with_grad = {part: False for part in PARTS[family]}
    for name, param in model.named_parameters():
        part = part_of(family, name)
        if param.grad is not None and param.grad.abs().sum() > 0:
            with_grad[part] = True
        elif part == "llm":
            raise AssertionError(f"{family}: LLM parameter {name} got no gradient")
    assert all(with_grad.values()), with_grad

    model.eval()
    prompt = processor.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[[image]], return_tensors="pt")
    inputs.pop("labels", None)
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape[1] - inputs["input_ids"].shape[1] == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_seeded_and_idempotent(family, tiny_vlm, tmp_path):
    def weights(folder):
        return load_file(os.path.join(folder, "model.safetensors"))

    folder = tiny_vlm(family)
    first = weights(folder)
    stamp = {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in os.listdir(folder)}
    assert make_tiny_vlm(family, folder) == folder  # already complete: not rebuilt
    assert {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in os.listdir(folder)} == stamp

    again = weights(make_tiny_vlm(family, str(tmp_path / "again"), seed=0))
    assert again.keys() == first.keys()
    assert all(torch.equal(again[k], first[k]) for k in first)
    other = weights(tiny_vlm(family, seed=1))
    assert any(not torch.equal(other[k], first[k]) for k in first)


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_prefix_stable(family, tiny_vlm):
    processor = AutoProcessor.from_pretrained(tiny_vlm(family))

    def render(messages, **kwargs):
        return processor.apply_chat_template(messages, tokenize=False, **kwargs)

    full = render(CONVERSATION)
    for k in range(1, len(CONVERSATION) + 1):
        assert full.startswith(render(CONVERSATION[:k]))
        if CONVERSATION[k - 1]["role"] == "user":  # the generation prompt is a prefix of the answer turn
            assert render(CONVERSATION[: k + 1]).startswith(render(CONVERSATION[:k], add_generation_prompt=True))
    # String content and typed parts render alike.
    as_string = [{"role": "user", "content": PLACEHOLDER[family] + "What color are the shapes?"}]
    as_parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color are the shapes?"}]}]
    # Not llava's template (an image part renders as "<image>\n") nor smolvlm's (upstream writes
    # "User:" with no space when the first part is an image, "User: " otherwise).
    if family not in ("llava", "llava_next", "smolvlm", "idefics3"):
        assert render(as_string) == render(as_parts)


def test_paligemma_prefix_suffix(tiny_vlm, image):
    """PaliGemma's processor: <bos> after the last <image>, "\\n" appended to the prefix; suffix=
    gets <eos> and token_type_ids 1, and labels are input_ids where token_type_ids == 1. With
    those token_type_ids the prefix attends bidirectionally, the suffix causally."""
    model, processor = load(tiny_vlm("paligemma"))
    tokenizer = processor.tokenizer
    inputs = processor(text=["<image>What color?"], images=[[image]], suffix=["red"], return_tensors="pt")
    tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
    # "\n" is one token of its own, as in the real PaliGemma tokenizer (vLLM's processor looks it up).
    assert tokens[IMAGE_TOKENS["paligemma"]:] == ["<bos>", "What", "Ġcolor", "?", "\n", "red", "<eos>"]
    types = inputs["token_type_ids"][0].tolist()
    assert types == [0] * (len(tokens) - 2) + [1, 1]
    assert inputs["labels"][0].tolist() == [-100] * (len(tokens) - 2) + inputs["input_ids"][0, -2:].tolist()

    model.eval()
    inputs.pop("labels")
    changed = inputs["input_ids"].clone()
    changed[0, -1] = tokenizer.unk_token_id
    with torch.no_grad():
        a = model(**inputs).logits
        b = model(**{**inputs, "input_ids": changed}).logits
    assert torch.equal(a[0, :-1], b[0, :-1])  # the suffix is causal: no earlier logit sees the last token
