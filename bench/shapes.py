"""What bench/training.py trains on: a shape (configs/shapes/NAME.yaml), built once with random
weights (seed 0, nothing downloaded) and saved with save_pretrained, and the batches both sides
train on.

- A composed shape is a vision config and an LLM config: vision/ and llm/ for ours, llava/ for the
  peer (the same tensors in transformers' Llava layout, the same connector start); synthetic
  batches without padding.
- A native shape (`kind: native`) is one released model (a qwen2_5_vl config): bench/native_shapes.py.
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
