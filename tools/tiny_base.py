"""A seeded, randomly initialised tiny base (vision tower + Llama LLM + tokenizer), built offline.

Saved with `save_pretrained`, so tests and the demo load it through the same `from_pretrained`
path a hub id takes.
"""

from __future__ import annotations

import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

# ChatML, as Qwen2 uses. Accepts a turn's content as a string or as a list of typed parts
# ({"type": "image"} / {"type": "text", "text": ...}), which is what multimodal clients send.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]

TINY_VISION = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    image_size=48, patch_size=6,  # 8x8 = 64 patches
)
TINY_LLM = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=False,
)


def train_bpe(corpus: list[str], special_tokens: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (any text encodes) trained on `corpus`, so its words are single tokens;
    `special_tokens` get ids 0..n-1, in order."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    return bpe


def build_tokenizer(corpus: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """The tiny base's tokenizer: BPE on `corpus`, ChatML special tokens and template."""
    bpe = train_bpe(corpus, SPECIAL_TOKENS, vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<image>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_base(out_dir: str, corpus: list[str], seed: int = 0, vision: str = "clip") -> dict:
    """Writes `out_dir/vision` and `out_dir/llm`; returns their paths."""
    torch.manual_seed(seed)
    paths = {"vision": os.path.join(out_dir, "vision"), "llm": os.path.join(out_dir, "llm")}
    if vision == "clip":
        tower = CLIPVisionModel(CLIPVisionConfig(**TINY_VISION))
        processor = CLIPImageProcessor(
            size={"shortest_edge": TINY_VISION["image_size"]},
            crop_size={"height": TINY_VISION["image_size"], "width": TINY_VISION["image_size"]},
        )
    elif vision == "siglip":
        tower = SiglipVisionModel(SiglipVisionConfig(**TINY_VISION))
        size = TINY_VISION["image_size"]
        processor = SiglipImageProcessor(size={"height": size, "width": size})
    else:
        raise ValueError(f"vision {vision!r}: choose clip or siglip")
    tower.save_pretrained(paths["vision"])
    processor.save_pretrained(paths["vision"])

    tokenizer = build_tokenizer(corpus)
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **TINY_LLM,
        )
    )
    llm.generation_config.eos_token_id = tokenizer.eos_token_id
    llm.generation_config.pad_token_id = tokenizer.pad_token_id
    llm.save_pretrained(paths["llm"])
    tokenizer.save_pretrained(paths["llm"])
    return paths
