"""What the `--dry_run` memory plan (model/memory_plan.py) reads of a model, for both kinds of base.

The plan's arithmetic is the same for every model: transformer stacks (the tower, the LLM) whose
blocks keep what autograd saves, a connector between them, a head and a loss. Only where those
parts are and how big an image is differ:

- a composed base answers from its parts: the tower cut at its feature layer (model/vision.py),
  the connector's own `saved_bytes_per_image`;
- a released VLM from the component table (model/components.py) and its config, with an image at
  the processor's pixel budget (`--max_pixels`, the largest an image can become) or, for a family
  of fixed resolution, at the tower's `image_size`. A family that tiles an image (SmolVLM,
  MiniCPM-V's slices) is planned per tile: give `images_per_sample` the tiles.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from model.components import patches_per_image_token
from model.released import ReleasedVLM, vision_layers_used


@dataclass
class Stack:
    """A transformer stack: its parameters and modules by full name, and its config (hidden_size,
    intermediate_size, num_attention_heads, num_hidden_layers, ...)."""

    params: list[tuple[str, nn.Parameter]]
    modules: list[tuple[str, nn.Module]]
    config: object

    def trains(self) -> bool:
        return any(p.requires_grad for _, p in self.params)


@dataclass
class Anatomy:
    vision: Stack
    llm: Stack
    connector: Stack
    vision_layers: int  # blocks of the tower whose output reaches the LLM
    tower_tokens: int  # the tower's sequence per image: patches (+ CLS)
    pixel_values: int  # values per image the patch embedding reads
    image_tokens: int  # what one image becomes in the LLM's sequence
    connector_saved: Callable[[bool, int], float]  # (connector trains, bytes per value) -> kept per image
    input_embeddings: nn.Module
    output_embeddings: nn.Module
    image: str  # the image the plan assumes, in words
    prefix_lm: bool = False  # a bidirectional prefix: the attention mask is a float [B, 1, L, L] at every layer
    notes: tuple[str, ...] = ()  # what the plan cannot model of this model


def anatomy(model) -> Anatomy:
    return released_anatomy(model) if isinstance(model, ReleasedVLM) else composed_anatomy(model)


def composed_anatomy(model) -> Anatomy:
    tower, llm = model.vision, model.llm
    return Anatomy(
        vision=Stack(list(tower.encoder.named_parameters()), list(tower.encoder.named_modules()), tower.encoder.config),
        llm=Stack(list(llm.named_parameters()), list(llm.named_modules()), llm.config),
        connector=Stack(list(model.connector.named_parameters()), list(model.connector.named_modules()), None),
        vision_layers=tower.layers_used,
        tower_tokens=tower.num_patches + tower.has_cls,
        pixel_values=3 * tower.image_size**2,
        image_tokens=model.num_image_tokens,
        connector_saved=model.connector.saved_bytes_per_image,
        input_embeddings=llm.get_input_embeddings(),
        output_embeddings=llm.get_output_embeddings(),
        image=f"{tower.image_size} px",
    )


def released_anatomy(model) -> Anatomy:
    config = model.config
    vision_config = config.vision_config

    def stack(component: str, stack_config) -> Stack:
        return Stack(
            [(n, p) for n, p in model.named_parameters() if model.component(n) == component],
            [(n, m) for n, m in model.named_modules() if model.component(n) == component],
            stack_config,
        )

    vision = stack("vision", vision_config)
    pixels, patches, image = _image_size(model.build_args, config)
    has_cls = any(n.endswith("class_embedding") for n, _ in vision.params)
    keeps_cls = has_cls and getattr(config, "vision_feature_select_strategy", "default") == "full"
    connector = stack("connector", None)
    image_tokens = patches // patches_per_image_token(config) + keeps_cls
    return Anatomy(
        vision=vision,
        llm=stack("llm", config.get_text_config()),
        connector=connector,
        vision_layers=vision_layers_used(config),
        tower_tokens=patches + has_cls,
        pixel_values=3 * pixels * getattr(vision_config, "temporal_patch_size", 1),
        image_tokens=image_tokens,
        connector_saved=lambda trains, act: _released_connector_saved(connector, image_tokens, trains, act),
        input_embeddings=model.base.get_input_embeddings(),
        output_embeddings=model.output_head(),
        image=image,
        prefix_lm=model.prefix_lm,
        notes=_unmodelled_layers(config.get_text_config()),
    )


# Attention layers the plan's block model covers; others (Qwen3.5's gated-delta-net linear
# attention in MiniCPM-V 4.6, Mamba mixers) keep state of their own.
_MODELLED_LAYERS = {"full_attention", "sliding_attention", "chunked_attention"}


def _unmodelled_layers(text_config) -> tuple[str, ...]:
    kinds = list(getattr(text_config, "layer_types", None) or [])
    other = sorted({kind for kind in kinds if kind not in _MODELLED_LAYERS})
    if not other:
        return ()
    count = sum(kind in other for kind in kinds)
    return (f"the LLM's {', '.join(other)} layers ({count} of {len(kinds)}) are planned as attention "
            "layers: what they keep is not modelled, so activations are a lower bound",)


def _image_size(args, config) -> tuple[int, int, str]:
    """Pixels and patches of the image the plan assumes, and how it was chosen: at the pixel
    budget, or at the tower's fixed size, whose border short of a whole patch the patch
    convolution drops (SigLIP at 384 px, patch 14: 27 x 27 patches)."""
    patch = _sides(config.vision_config.patch_size)
    if args.max_pixels:
        side = math.isqrt(args.max_pixels)
        return args.max_pixels, args.max_pixels // (patch[0] * patch[1]), (
            f"--max_pixels {args.max_pixels:,} (~{side}x{side} px)")
    size = getattr(config.vision_config, "image_size", None) or getattr(config, "image_size", None)
    if not size:
        raise ValueError(
            f"--dry_run: {config.model_type} resizes images to a pixel budget and none is set: "
            "pass --max_pixels (the largest image the plan should hold)."
        )
    (height, width) = _sides(size)
    return height * width, (height // patch[0]) * (width // patch[1]), (
        f"{height} px" if height == width else f"{height}x{width} px")


def _sides(size) -> tuple[int, int]:
    """(height, width) of an image or patch size given as one side (square) or as [height, width]
    (InternVL's config)."""
    return tuple(size) if isinstance(size, (list, tuple)) else (size, size)


def _released_connector_saved(connector: Stack, rows: int, trains: bool, act: int) -> float:
    """Per image, what a released connector keeps while a gradient passes through it. Its layers
    run at the image's tokens (`rows`: the merge, where there is one, comes first): a linear layer
    that trains keeps its input, an activation between two linear layers keeps its input, a norm
    its fp32 input (a norm before the merge holds the same values as the first layer's input)."""
    linears = [m for _, m in connector.modules if isinstance(m, nn.Linear)]
    if not linears:
        return 0.0
    kept = sum(act * rows * layer.in_features for layer in linears) if trains else 0.0
    kept += sum(act * rows * layer.in_features for layer in linears[1:])
    norms = sum(1 for _, m in connector.modules if "norm" in type(m).__name__.lower())
    return kept + norms * 4 * rows * linears[0].in_features
