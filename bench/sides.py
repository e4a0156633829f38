"""The two sides of scripts/bench.py, each built in its own process: ours through the project's
path (a composed base by build_model, a released VLM by --vlm_model; then apply_freeze_policy, as
train.py does), the peer as a user of transformers + TRL would build it (Llava, or the same
released model), frozen alike and with LoRA on the same layers. Each side's synthetic or
processor-made batches, and for ours its model FLOPs and its --dry_run memory plan.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from scripts.bench_shapes import (
    Collate,
    NativeCollate,
    base_dir,
    image_tokens_per_image,
    is_native,
    load_shape,
    native_component,
    native_samples,
    peer_image_token,
    supervised_positions,
    synthetic_samples,
)

if TYPE_CHECKING:
    from scripts.bench import BenchArguments

# recipe -> ModelArguments flags, as the shipped configs set them.
RECIPES = {
    "full": {"freeze_vit": False, "freeze_qformer": False, "freeze_llm": False},  # configs/demo.yaml
    "frozen_vit": {"freeze_vit": True, "freeze_qformer": False, "freeze_llm": False},  # llava15_finetune
    "lora": {"freeze_vit": True, "freeze_qformer": False, "freeze_llm": True, "lora_enable": True,
             "lora_target": "llm"},  # llava15_lora
    "pretrain": {"freeze_vit": True, "freeze_qformer": False, "freeze_llm": True},  # llava15_pretrain
}


def model_args_of(args: BenchArguments, base: str, recipe: str, shape: dict):
    """Ours' ModelArguments for a recipe: the released model in `base` (a native shape; its pixel
    budget is the shape's image, which the processor keeps as it is and the plan assumes), or a
    composed base from base/vision and base/llm."""
    from config import ModelArguments

    if is_native(shape):
        pixels = shape["image_size"] ** 2
        return ModelArguments(vlm_model=base, dtype=args.dtype, fused_loss=args.fused_loss, lora_r=args.lora_r,
                              lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, min_pixels=pixels,
                              max_pixels=pixels, **RECIPES[recipe])
    return ModelArguments(
        vision_model=os.path.join(base, "vision"),
        llm_model=os.path.join(base, "llm"),
        dtype=args.dtype,
        vision_feature_layer=shape.get("vision_feature_layer", -2),
        connector="mlp2x_gelu",
        fused_loss=args.fused_loss,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        **RECIPES[recipe],
    )


def build_ours(args: BenchArguments, base: str, recipe: str, shape: dict):
    """build_model + apply_freeze_policy, as train.py does; the connector starts where the peer's does."""
    from safetensors.torch import load_file

    from model.build import build_model
    from model.freeze import apply_freeze_policy

    model_args = model_args_of(args, base, recipe, shape)
    model = build_model(model_args)
    model.connector.load_state_dict(load_file(os.path.join(base, "connector.safetensors")))
    apply_freeze_policy(model, model_args)
    return model


def build_peer(args: BenchArguments, base: str, recipe: str, shape: dict):
    """LlavaForConditionalGeneration.from_pretrained, frozen as the recipe says with requires_grad,
    LoRA by peft on the same LLM linear layers (r, alpha, dropout) with the projector trainable.
    Trainable weights in fp32, frozen ones in the base dtype: what our freeze policy does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    from model.build import linear_module_names

    flags = RECIPES[recipe]
    model = LlavaForConditionalGeneration.from_pretrained(os.path.join(base, "llava"), dtype=getattr(torch, args.dtype))
    trains = {"vision_tower": not flags["freeze_vit"], "multi_modal_projector": not flags["freeze_qformer"],
              "language_model": not flags["freeze_llm"], "lm_head": not flags["freeze_llm"]}
    for name, param in model.named_parameters():
        part = next(p for p in trains if f"{p}." in name)
        param.requires_grad_(trains[part])
    if flags.get("lora_enable"):
        names = "|".join(linear_module_names(model.model.language_model))
        config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                            target_modules=rf".*language_model\..*\.({names})")
        model = get_peft_model(model, config)
        for param in model.base_model.model.model.multi_modal_projector.parameters():
            param.requires_grad_(True)  # peft froze it; the recipe trains it
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def _count(model, component_of) -> dict[str, tuple[int, int]]:
    """component -> (trainable, total) parameters that reach the loss (a tied tensor once)."""
    out: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        part = component_of(name)
        if part:
            row = out.setdefault(part, [0, 0])
            row[0] += param.numel() * param.requires_grad
            row[1] += param.numel()
    return {k: tuple(v) for k, v in out.items()}


def _peer_component(name: str) -> str | None:
    if "vision_tower." in name:
        return None  # it holds layers past the feature layer (and a pooling head) that ours cuts off
    if "multi_modal_projector." in name:
        return "connector"
    return "llm"


def build_native_ours(args: BenchArguments, base: str, recipe: str, shape: dict):
    """The repository's path for a released VLM, as train.py takes it: load_base with --vlm_model
    (model/released.py), then apply_freeze_policy."""
    from model.freeze import apply_freeze_policy
    from run.checkpoint import load_base

    model_args = model_args_of(args, base, recipe, shape)
    model = load_base(model_args)
    apply_freeze_policy(model, model_args)
    return model


def build_native_peer(args: BenchArguments, base: str, recipe: str):
    """AutoModelForImageTextToText.from_pretrained of the same folder, frozen as the recipe says
    with requires_grad, LoRA by peft on every linear layer of the LLM (r, alpha, dropout) with the
    merger trainable. Trainable weights in fp32, frozen ones in the base dtype."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from model.build import linear_module_names

    flags = RECIPES[recipe]
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=getattr(torch, args.dtype))
    trains = {"vision": not flags["freeze_vit"], "connector": not flags["freeze_qformer"], "llm": not flags["freeze_llm"]}
    for name, param in model.named_parameters():
        param.requires_grad_(trains[native_component(name)])
    if flags.get("lora_enable"):
        names = "|".join(linear_module_names(model.model.language_model))
        config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                            target_modules=rf".*language_model\..*\.({names})")
        model = get_peft_model(model, config)
        for name, param in model.named_parameters():
            if native_component(name) == "connector":
                param.requires_grad_(trains["connector"])  # peft froze it; the recipe trains it
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


@dataclass
class Side:
    """One side built in its child, on its device: the model, its batches, and what the row says
    of it beside the timings (ours only: model FLOPs and the plan)."""

    model: object
    collate: object
    counts: dict
    vocab: int
    flops: dict | None = None
    plan: object = None


def build_side(args: BenchArguments, side: str, recipe: str, device) -> Side:
    """The shape's model for `side` (seeded), its synthetic batches, and ours' FLOPs and plan."""
    shape_name, shape = load_shape(args.shape)
    base = base_dir(shape_name, shape, args.dtype, args.workdir)
    if is_native(shape):
        return _native_side(args, side, recipe, device, base, shape)
    return _composed_side(args, side, recipe, device, base, shape)


def _native_side(args: BenchArguments, side: str, recipe: str, device, base: str, shape: dict) -> Side:
    """Both sides: the same released model from the same folder, the same processor-made batches."""
    import torch

    from tools.flops import qwen2_5_vl_step_flops
    from tools.memory import plan_memory

    torch.manual_seed(0)
    model = build_native_ours(args, base, recipe, shape) if side == "ours" else build_native_peer(args, base, recipe)
    model.to(device)
    vocab = shape["llm"]["vocab_size"]
    batch = native_samples(base, shape, args.batch_size, args.seq_len, args.images, vocab)
    built = Side(model, NativeCollate(batch, args.images), vocab=vocab,
                 counts=_count(model, model.component if side == "ours" else native_component))
    if side == "ours":
        built.flops = qwen2_5_vl_step_flops(model.base, batch)
        supervised = int((batch["labels"][:, 1:] != -100).sum())
        built.plan = plan_memory(model, args.batch_size, args.seq_len, args.gradient_checkpointing,
                                 images_per_sample=args.images, supervised_tokens=supervised, padded=False)
    return built


def _composed_side(args: BenchArguments, side: str, recipe: str, device, base: str, shape: dict) -> Side:
    """Ours composed from vision/ and llm/, the peer Llava from llava/; synthetic batches."""
    import torch

    from tools.flops import step_flops
    from tools.memory import plan_memory

    batch_size, seq_len = args.batch_size, args.seq_len
    torch.manual_seed(0)
    ours = build_ours(args, base, recipe, shape) if side == "ours" else None
    model = ours if side == "ours" else build_peer(args, base, recipe, shape)
    model.to(device)

    image_size, vocab = shape["vision"]["image_size"], shape["llm"]["vocab_size"]
    image_tokens = image_tokens_per_image(shape)
    image_token = ours.image_token_index if side == "ours" else peer_image_token(vocab)
    input_ids, labels, pixel_values = synthetic_samples(
        batch_size, seq_len, args.images, image_tokens, vocab, image_size, image_token
    )
    supervised = supervised_positions(batch_size, seq_len, args.images, image_tokens)
    built = Side(model, Collate(input_ids, labels, pixel_values, args.images), vocab=vocab,
                 counts=_count(model, lambda n: n.split(".", 1)[0]) if side == "ours" else _count(model, _peer_component))
    if side == "ours":
        built.flops = step_flops(ours, batch_size, seq_len, args.images, supervised)
        built.plan = plan_memory(model, batch_size, seq_len, args.gradient_checkpointing,
                                 images_per_sample=args.images, supervised_tokens=supervised, padded=False)
    return built


