"""The two sides of bench/training.py, each built in its own process: ours through the project's
path (a composed base by build_model, a released VLM by --vlm_model; then apply_freeze_policy, as
train.py does), the peer as a user of transformers + TRL would build it (Llava, or the same
released model), frozen alike and with LoRA on the same layers. Each side's synthetic or
processor-made batches, and for ours its model FLOPs and its --dry_run memory plan.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from bench.arguments import BenchArguments, recipe_flags
from bench.native_shapes import NativeCollate, native_component, native_samples
from bench.shapes import (
    Collate,
    base_dir,
    image_tokens_per_image,
    is_native,
    load_shape,
    peer_image_token,
    supervised_positions,
    synthetic_samples,
)
from constants import IGNORE_INDEX


def model_args_of(args: BenchArguments, base: str, recipe: str, shape: dict):
    """Ours' ModelArguments for a recipe: the released model in `base` (a native shape; its pixel
    budget is the shape's image, which the processor keeps as it is and the plan assumes), or a
    composed base from base/vision and base/llm."""
    from config import ModelArguments

    if is_native(shape):
        pixels = shape["image_size"] ** 2
        return ModelArguments(vlm_model=base, dtype=args.dtype, fused_loss=args.fused_loss, lora_r=args.lora_r,
                              lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, min_pixels=pixels,
                              max_pixels=pixels, **recipe_flags(recipe))
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
        **recipe_flags(recipe),
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
    """LlavaForConditionalGeneration.from_pretrained, frozen and adapted as ours is
    (`freeze_like_ours`)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(os.path.join(base, "llava"), dtype=getattr(torch, args.dtype))
    return freeze_like_ours(model, model_args_of(args, base, recipe, shape), llava_component)


def freeze_like_ours(model, flags, component_of):
    """The peer frozen as the recipe says with requires_grad (`component_of`: a parameter's
    component), LoRA by peft on every linear layer of the LLM (our `lora_r`, `lora_alpha`,
    `lora_dropout` in `flags`, our ModelArguments) with the connector as the recipe says; trainable
    weights in fp32, frozen ones in the base dtype: what our freeze policy does."""
    import torch
    from peft import LoraConfig, get_peft_model

    from model.build import linear_module_names

    trains = {"vision": not flags.freeze_vit, "connector": not flags.freeze_qformer, "llm": not flags.freeze_llm}
    for name, param in model.named_parameters():
        param.requires_grad_(trains[component_of(name)])
    if flags.lora_enable:
        names = "|".join(linear_module_names(model.model.language_model))
        config = LoraConfig(r=flags.lora_r, lora_alpha=flags.lora_alpha, lora_dropout=flags.lora_dropout,
                            target_modules=rf".*language_model\..*\.({names})")
        model = get_peft_model(model, config)
        for name, param in model.named_parameters():
            if component_of(name) == "connector":
                param.requires_grad_(trains["connector"])  # peft froze it; the recipe says
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def llava_component(name: str) -> str:
    """A Llava parameter's component, by transformers' names (the head is the LLM's)."""
    if "vision_tower." in name:
        return "vision"
    return "connector" if "multi_modal_projector." in name else "llm"


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


def _peer_counted(name: str) -> str | None:
    # The peer's tower holds layers past the feature layer (and a pooling head) that ours cuts off.
    part = llava_component(name)
    return None if part == "vision" else part


def build_native_ours(args: BenchArguments, base: str, recipe: str, shape: dict):
    """The repository's path for a released VLM, as train.py takes it: load_base with --vlm_model
    (model/released.py), then apply_freeze_policy."""
    from model.freeze import apply_freeze_policy
    from run.checkpoint import load_base

    model_args = model_args_of(args, base, recipe, shape)
    model = load_base(model_args)
    apply_freeze_policy(model, model_args)
    return model


def build_native_peer(args: BenchArguments, base: str, recipe: str, shape: dict):
    """AutoModelForImageTextToText.from_pretrained of the same folder, frozen and adapted as ours
    is (`freeze_like_ours`; the merger is the connector)."""
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(base, dtype=getattr(torch, args.dtype))
    return freeze_like_ours(model, model_args_of(args, base, recipe, shape), native_component)


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

    from bench.flops import qwen2_5_vl_step_flops
    from model.memory_plan import plan_memory

    torch.manual_seed(0)
    model = build_native_ours(args, base, recipe, shape) if side == "ours" else build_native_peer(args, base, recipe, shape)
    model.to(device)
    vocab = shape["llm"]["vocab_size"]
    batch = native_samples(base, shape, args.batch_size, args.seq_len, args.images, vocab)
    built = Side(model, NativeCollate(batch, args.images), vocab=vocab,
                 counts=_count(model, model.component if side == "ours" else native_component))
    if side == "ours":
        built.flops = qwen2_5_vl_step_flops(model.base, batch)
        supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        built.plan = plan_memory(model, args.batch_size, args.seq_len, args.gradient_checkpointing,
                                 images_per_sample=args.images, supervised_tokens=supervised, padded=False)
    return built


def _composed_side(args: BenchArguments, side: str, recipe: str, device, base: str, shape: dict) -> Side:
    """Ours composed from vision/ and llm/, the peer Llava from llava/; synthetic batches."""
    import torch

    from bench.flops import step_flops
    from model.memory_plan import plan_memory

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
                 counts=_count(model, lambda n: n.split(".", 1)[0]) if side == "ours" else _count(model, _peer_counted))
    if side == "ours":
        built.flops = step_flops(ours, batch_size, seq_len, args.images, supervised)
        built.plan = plan_memory(model, batch_size, seq_len, args.gradient_checkpointing,
                                 images_per_sample=args.images, supervised_tokens=supervised, padded=False)
    return built


