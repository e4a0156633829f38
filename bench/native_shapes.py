"""A native shape (`kind: native`, configs/shapes/NAME.yaml): one released model (a qwen2_5_vl
config) that both sides of bench/training.py train, built once with random weights in one folder
(model and processor) that ours loads with --vlm_model and the peer with
AutoModelForImageTextToText; its batches made by the model's own processor and chat template.
"""

from __future__ import annotations

import os

from constants import IGNORE_INDEX

# fixtures/tiny_vlms.py's Qwen2.5-VL tokenizer: these special tokens take ids 0..6, in this order.
QWEN2_5_VL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]
NATIVE_PROMPT = "Describe the picture."


def native_processor(shape: dict):
    """Qwen2.5-VL's processor, built offline from fixtures/tiny_vlms.py's pieces (a byte-level BPE
    tokenizer with the family's special tokens, its ChatML template), the pixel budget set so that
    an `image_size` square image keeps its size."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    from fixtures.tiny_vlms import bpe_tokenizer
    from fixtures.tiny_vlms_qwen import QWEN2_5_VL_TEMPLATE

    vision, size = shape["vision"], shape["image_size"]
    unit = vision["patch_size"] * vision["spatial_merge_size"]
    if shape["model_type"] != "qwen2_5_vl" or size % unit:
        raise SystemExit(f"native shape: a qwen2_5_vl model with image_size a multiple of {unit} (patch x merge).")
    tokenizer = bpe_tokenizer(QWEN2_5_VL_SPECIALS, QWEN2_5_VL_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    pixels = dict(min_pixels=size * size, max_pixels=size * size, patch_size=vision["patch_size"],
                  merge_size=vision["spatial_merge_size"], temporal_patch_size=vision["temporal_patch_size"])
    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tokenizer,
                               video_processor=Qwen2VLVideoProcessor(**pixels), chat_template=QWEN2_5_VL_TEMPLATE)


def native_config(shape: dict, tokenizer):
    """The model's config: the shape's vision and llm sections, the tokenizer's special ids."""
    from transformers import CONFIG_MAPPING

    image, video, start, end = tokenizer.convert_tokens_to_ids(
        ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])
    vision = {k: v for k, v in shape["vision"].items() if k != "model_type"}
    text = {k: v for k, v in shape["llm"].items() if k != "model_type"}
    text.update(bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CONFIG_MAPPING[shape["model_type"]](
        vision_config=vision, text_config=text, image_token_id=image, video_token_id=video,
        vision_start_token_id=start, vision_end_token_id=end, tie_word_embeddings=shape.get("tie_word_embeddings", False),
    )


def build_native(out: str, shape: dict, dtype_name: str) -> None:
    """One folder in the released layout, which `--vlm_model DIR` (ours) and
    AutoModelForImageTextToText (the peer) both load: the model, random weights (seed 0), and its
    processor."""
    import torch
    from transformers import AutoModelForImageTextToText

    processor = native_processor(shape)
    config = native_config(shape, processor.tokenizer)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).to(getattr(torch, dtype_name))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    with open(os.path.join(out, "complete"), "w") as f:
        f.write("built\n")


def native_samples(base: str, shape: dict, n: int, seq_len: int, images: int, vocab: int) -> dict:
    """`n` samples of exactly `seq_len` tokens (no padding), made by the model's own processor and
    chat template through data/processor_prompt.encode_batch: a user turn of `images` seeded
    random images and a question, an assistant answer. The answer is lengthened with seeded random
    text tokens (no special token) to `seq_len`; labels on the answer and its end of turn only, as
    encode_batch sets them. Both sides train on these very tensors."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoProcessor

    from data.processor_prompt import SEQUENCE_KEYS, encode_batch

    processor = AutoProcessor.from_pretrained(base)
    rng, size = np.random.default_rng(0), shape["image_size"]
    messages = [{"role": "user", "content": "<image>\n" * images + NATIVE_PROMPT}, {"role": "assistant", "content": "A"}]
    batch = encode_batch(processor, [
        (messages, [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(images)])
        for _ in range(n)
    ])
    assert bool(batch["attention_mask"].all()), "the same prompt and image size on every row: no padding"
    answer = int((batch["labels"][0] != IGNORE_INDEX).nonzero()[0])  # the first supervised position, every row's
    extra = seq_len - batch["input_ids"].shape[1]
    if extra < 0:
        raise SystemExit(f"--seq_len {seq_len}: the prompt and {images} image(s) take {seq_len - extra} tokens.")
    low = 1 + max(processor.tokenizer.added_tokens_decoder)  # past every special token
    text = torch.randint(low, vocab, (n, extra), generator=torch.Generator().manual_seed(0))
    fills = {"input_ids": text, "labels": text, "attention_mask": torch.ones_like(text)}
    for key in [*SEQUENCE_KEYS, "labels"]:
        if key in batch:  # token_type_ids, mm_token_type_ids: 0, text
            fill = fills.get(key, torch.zeros_like(text))
            batch[key] = torch.cat([batch[key][:, :answer], fill, batch[key][:, answer:]], dim=1)
    return batch


class NativeCollate:
    """Rows of a native batch by index: their tokens, their images' patches and grids (every image
    the same size, so each row holds as many patches)."""

    def __init__(self, batch: dict, images: int):
        n = batch["input_ids"].shape[0]
        self.rows = {k: v for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
        self.pixel_values = batch["pixel_values"].reshape(n, -1, batch["pixel_values"].shape[-1])
        self.grid = batch["image_grid_thw"].reshape(n, images, 3)

    def __call__(self, rows):
        import torch

        idx = torch.tensor([r["idx"] for r in rows])
        out = {k: v[idx] for k, v in self.rows.items()}
        out["pixel_values"] = self.pixel_values[idx].flatten(0, 1)
        out["image_grid_thw"] = self.grid[idx].flatten(0, 1)
        return out


def native_component(name: str) -> str:
    """A Qwen2.5-VL parameter's component, by transformers' names: the merger (the connector)
    sits inside the tower `visual`; the rest is the LLM, its head included."""
    if ".merger." in f".{name}":
        return "connector"
    return "vision" if ".visual." in f".{name}" else "llm"
