"""What bench/training.py trains on: a shape (configs/shapes/NAME.yaml), built once with random
weights (seed 0, nothing downloaded) and saved with save_pretrained, and the batches both sides
train on.

- A composed shape is a vision config and an LLM config: vision/ and llm/ for ours, llava/ for the
  peer (the same tensors in transformers' Llava layout, the same connector start); synthetic
  batches without padding.
- A native shape (`kind: native`) is one released model (a qwen2_5_vl config): one folder, model
  and processor, that ours loads with --vlm_model and the peer with AutoModelForImageTextToText;
  its batches are made by the model's own processor and chat template.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

import yaml

from constants import IGNORE_INDEX

SHAPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "shapes")


def load_shape(name: str) -> tuple[str, dict]:
    path = name if name.endswith((".yaml", ".yml")) else os.path.join(SHAPES, f"{name}.yaml")
    with open(path) as f:
        shape = yaml.safe_load(f)
    return os.path.splitext(os.path.basename(path))[0], shape


def is_native(shape: dict) -> bool:
    """A native shape is one released model (its `model_type`, e.g. qwen2_5_vl) that both sides
    train; a composed one (the default) is a tower and an LLM, ours composed, the peer Llava."""
    return shape.get("kind", "composed") == "native"


def work_dir(workdir: str | None) -> str:
    """Where built shapes are kept: --workdir, or $TMPDIR/vlm_bench."""
    return workdir or os.path.join(tempfile.gettempdir(), "vlm_bench")


def base_dir(shape_name: str, shape: dict, dtype: str, workdir: str | None) -> str:
    """One folder per model config and dtype: an edited shape is built again, never reused stale."""
    model = [shape["vision"], shape["llm"], shape.get("vision_feature_layer", -2), dtype]
    if is_native(shape):
        model = [shape["model_type"], shape["vision"], shape["llm"], shape["image_size"],
                 shape.get("tie_word_embeddings", False), dtype]
    key = hashlib.sha256(json.dumps(model, sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(work_dir(workdir), f"{shape_name}-{key}")


def shape_config(shape: dict, part: str):
    """The transformers config of a shape's `vision` or `llm` section."""
    from transformers import CONFIG_MAPPING

    values = dict(shape[part])
    return CONFIG_MAPPING[values.pop("model_type")](**values)


def image_tokens_per_image(shape: dict) -> int:
    """mlp2x_gelu: one token per patch (a CLIP tower's CLS is dropped on both sides). A native
    Qwen2.5-VL: one token per 2 x 2 patches (its merger), of an `image_size` square image."""
    if is_native(shape):
        vision = shape["vision"]
        return (shape["image_size"] // vision["patch_size"] // vision["spatial_merge_size"]) ** 2
    return (shape["vision"]["image_size"] // shape["vision"]["patch_size"]) ** 2


def build_base(out: str, shape: dict, dtype_name: str) -> None:
    """vision/, llm/ (ours), connector.safetensors (our MLPProjector's seeded start) and llava/
    (the peer: the same vision, connector and LLM tensors in transformers' Llava layout)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    from model.connectors.mlp import MLPProjector

    dtype = getattr(torch, dtype_name)
    vision_config, llm_config = shape_config(shape, "vision"), shape_config(shape, "llm")
    torch.manual_seed(0)
    vision = MODEL_MAPPING[type(vision_config)](vision_config).to(dtype)
    llm = AutoModelForCausalLM.from_config(llm_config).to(dtype)
    connector = MLPProjector(vision_config.hidden_size, llm_config.hidden_size, image_tokens_per_image(shape))  # fp32, as build_model makes it
    vision.save_pretrained(os.path.join(out, "vision"))
    llm.save_pretrained(os.path.join(out, "llm"))
    save_file(connector.state_dict(), os.path.join(out, "connector.safetensors"))

    has_cls = vision_config.model_type.startswith("clip")
    llava = LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=vision_config,
            text_config=llm_config,
            image_token_index=peer_image_token(llm_config.vocab_size),
            image_seq_length=image_tokens_per_image(shape),
            projector_hidden_act="gelu",  # nn.GELU(), exact: our MLPProjector's activation
            vision_feature_layer=shape.get("vision_feature_layer", -2),
            # Llava's "default" drops the first token: right for CLIP's CLS, wrong for SigLIP.
            vision_feature_select_strategy="default" if has_cls else "full",
        )
    ).to(dtype)
    llava.model.vision_tower.load_state_dict(vision.state_dict())
    llava.model.multi_modal_projector.load_state_dict(connector.state_dict())
    llava.model.language_model.load_state_dict(llm.get_decoder().state_dict())
    llava.lm_head.load_state_dict(llm.get_output_embeddings().state_dict())
    llava.save_pretrained(os.path.join(out, "llava"))
    with open(os.path.join(out, "complete"), "w") as f:
        f.write("built\n")


def write_configs(out: str, shape: dict) -> None:
    """vision/config.json and llm/config.json alone: what build_model(weights=False) reads."""
    for part in ("vision", "llm"):
        shape_config(shape, part).save_pretrained(os.path.join(out, part))


def supervised_positions(batch_size: int, seq_len: int, images: int, image_tokens: int) -> int:
    """Positions whose next token has a label in `synthetic_samples`' batches: the text after the
    images, less the last token, which predicts nothing."""
    return batch_size * (seq_len - 1 - images * image_tokens)


def peer_image_token(vocab_size: int) -> int:
    """Llava marks image positions with a real token id: the last one, which no text uses here."""
    return vocab_size - 1


# --- synthetic batches ----------------------------------------------------------------------------


def synthetic_samples(n: int, seq_len: int, images: int, image_tokens: int, vocab: int, image_size: int,
                      image_token: int):
    """`n` samples of exactly `seq_len` tokens (no padding): one text token, the image slots, then
    text. Labels on the text after the images, as an answer carries them; the image slots and the
    first token carry none. Seeded: both sides train on the same numbers."""
    import torch

    g = torch.Generator().manual_seed(0)
    slots = images * image_tokens
    if seq_len <= slots + 2:
        raise SystemExit(f"--seq_len {seq_len} leaves no text after {images} image(s) of {image_tokens} tokens.")
    input_ids = torch.randint(0, vocab - 1, (n, seq_len), generator=g)  # vocab - 1: the peer's image token
    labels = input_ids.clone()
    input_ids[:, 1 : 1 + slots] = image_token
    labels[:, : 1 + slots] = IGNORE_INDEX
    pixel_values = torch.randn(n * images, 3, image_size, image_size, generator=g)
    return input_ids, labels, pixel_values


class Collate:
    """Rows of the pre-built samples by index: the same cost on both sides, no padding."""

    def __init__(self, input_ids, labels, pixel_values, images: int):
        self.input_ids, self.labels, self.pixel_values, self.images = input_ids, labels, pixel_values, images

    def __call__(self, rows):
        import torch

        idx = torch.tensor([r["idx"] for r in rows])
        pix = (idx[:, None] * self.images + torch.arange(self.images)).flatten()
        ids = self.input_ids[idx]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": self.labels[idx],
                "pixel_values": self.pixel_values[pix]}


# --- a native shape: one released model, both sides ------------------------------------------------

# tools/tiny_vlms.py's Qwen2.5-VL tokenizer: these special tokens take ids 0..6, in this order.
QWEN2_5_VL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]
NATIVE_PROMPT = "Describe the picture."


def native_processor(shape: dict):
    """Qwen2.5-VL's processor, built offline from tools/tiny_vlms.py's pieces (a byte-level BPE
    tokenizer with the family's special tokens, its ChatML template), the pixel budget set so that
    an `image_size` square image keeps its size."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    from tools.tiny_vlms import QWEN2_5_VL_TEMPLATE, _tokenizer

    vision, size = shape["vision"], shape["image_size"]
    unit = vision["patch_size"] * vision["spatial_merge_size"]
    if shape["model_type"] != "qwen2_5_vl" or size % unit:
        raise SystemExit(f"native shape: a qwen2_5_vl model with image_size a multiple of {unit} (patch x merge).")
    tokenizer = _tokenizer(QWEN2_5_VL_SPECIALS, QWEN2_5_VL_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>")
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
