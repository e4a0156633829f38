"""Model FLOPs of a training step, counted analytically from the model as built and frozen:
what the recipe needs, whatever an implementation spends beyond it. Used by bench/training.py for
achieved FLOP/s and MFU.

Per weight of N values on T tokens: forward 2NT; backward 2NT for the input gradient when
anything trainable sits before the weight, 2NT for the weight gradient when it trains. Attention
adds 4 L^2 d per sequence and layer forward (half for a causal LLM), twice that backward where a
gradient passes. The LM head counts only the positions that have a label.
"""

from __future__ import annotations

import math

from constants import IGNORE_INDEX
from model.components import layer_index


def _matmul_flops(stage, tokens: int, upstream_trains: bool, skip=()) -> tuple[float, bool, dict[int, bool]]:
    """FLOPs of every Linear / Conv2d of `stage` applied to `tokens` positions, fwd + bwd.

    The rule, per weight of N values on T tokens: the forward is 2NT. The backward has two
    matmuls of 2NT each: the gradient of the input, needed when anything trainable sits before
    this weight (it must reach it), and the gradient of the weight, needed when the weight
    trains. So a trained weight costs 6NT (the usual 6N per token), a frozen weight behind
    something trainable 4NT (forward + input gradient; every LLM weight under LoRA or a
    connector-only recipe is one: the connector trains before the LLM), and a frozen weight with
    nothing trainable before it 2NT (the frozen tower). "Before" is counted by block: a layer
    sees what trains in earlier stages and earlier layers (exact for these recipes, where a
    stage trains entirely or not at all, or LoRA follows a trained connector). A LoRA adapter's
    A and B are weights like any other. A trained first layer's unneeded input gradient is
    counted anyway (the patch embedding in `full`; negligible).

    Returns (flops, whether anything in the stage trains, layer index -> gradient passes it)."""
    from torch import nn

    groups: dict[float, list[tuple[int, bool]]] = {}
    for name, module in stage.named_modules():
        if module in skip or not isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d)):
            continue
        index = layer_index(name)  # a numbered block: `layers.N` (towers, decoders), `blocks.N` (Qwen2.5-VL's tower)
        order = index if index is not None else (-1 if "embed" in name else math.inf)
        numel = module.weight.numel()  # a conv's weight, per output position, is a linear map too
        groups.setdefault(order, []).append((numel, module.weight.requires_grad))
    flops, grad_through = 0.0, {}
    for order in sorted(groups):
        trains_here = any(t for _, t in groups[order])
        for numel, trains in groups[order]:
            flops += (6 if trains else 4 if upstream_trains else 2) * numel * tokens
        if order not in (-1, math.inf):
            grad_through[int(order)] = upstream_trains or trains_here
        upstream_trains = upstream_trains or trains_here
    return flops, upstream_trains, grad_through


def _attention_flops(config, grad_through: dict[int, bool], sequences: int, length: int, causal: bool) -> float:
    """Scores (Q K^T) and the weighted sum (P V): 4 L^2 d per sequence and layer forward, half of
    it when causal (only the lower triangle is needed); the backward is twice the forward when a
    gradient passes the layer, nothing otherwise. d is the query width (GQA shares K/V, not work)."""
    heads = config.num_attention_heads
    width = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)
    forward = 4 * sequences * length * length * width * (0.5 if causal else 1.0)
    return sum(forward * (3 if through else 1) for through in grad_through.values())


def step_flops(model, batch_size: int, seq_len: int, images: int, supervised: int) -> dict[str, float]:
    """Model FLOPs of one training step of our model as built and frozen: what the recipe needs,
    whatever an implementation spends beyond it (the peer's vision layer past the feature layer,
    logits nobody reads). The LM head counts the `supervised` positions only (those with a label):
    logits elsewhere never reach the loss. Norms, activations and the softmax are not counted."""
    vision, llm = model.vision, model.llm
    n_images = batch_size * images
    v_len = vision.num_patches + vision.has_cls  # CLS runs through the layers even when dropped
    v_flops, upstream, v_through = _matmul_flops(vision.encoder, n_images * v_len, False)
    v_attn = _attention_flops(vision.encoder.config, v_through, n_images, v_len, causal=False)
    c_flops, upstream, _ = _matmul_flops(model.connector, n_images * model.num_image_tokens, upstream)
    head = llm.get_output_embeddings()
    l_flops, upstream, l_through = _matmul_flops(llm, batch_size * seq_len, upstream, skip=(head,))
    l_attn = _attention_flops(llm.config, l_through, batch_size, seq_len, causal=True)
    head_flops = (6 if head.weight.requires_grad else 4 if upstream else 2) * head.weight.numel() * supervised
    parts = {"vision": v_flops + v_attn, "connector": c_flops, "llm": l_flops + l_attn + head_flops}
    parts["total"] = sum(parts.values())
    return parts


def qwen2_5_vl_step_flops(model, batch: dict) -> dict[str, float]:
    """Model FLOPs of one training step of a released Qwen2.5-VL (`model`: the transformers model,
    LoRA adapters inside its layers) on `batch` (input_ids, labels, image_grid_thw), by the rules
    of `step_flops`: the tower's weights on every patch (the patch embedding a Conv3d), its
    attention over windows in most blocks and over each whole image in `fullatt_block_indexes`;
    the merger on every 2 x 2 group of patches; the LLM on every position, its head on the
    labelled ones."""
    from transformers.vision_utils import get_vision_window_index

    visual, llm = model.model.visual, model.model.language_model
    config, grid = visual.config, batch["image_grid_thw"]
    patches = int(grid.prod(-1).sum())
    v_flops, upstream, v_through = _matmul_flops(visual, patches, False, skip=set(visual.merger.modules()))
    _, cu_windows = get_vision_window_index(grid, config.spatial_merge_size, config.window_size, config.patch_size)
    windows = [int(n) for n in cu_windows.diff()]
    frames = [int(h * w) for t, h, w in grid.tolist() for _ in range(int(t))]
    v_attn = sum(
        4 * config.hidden_size * sum(n * n for n in (frames if block in config.fullatt_block_indexes else windows))
        * (3 if through else 1)
        for block, through in v_through.items()
    )
    merged = patches // config.spatial_merge_size**2
    c_flops, upstream, _ = _matmul_flops(visual.merger, merged, upstream)
    batch_size, seq_len = batch["input_ids"].shape
    head = model.get_output_embeddings()
    l_flops, upstream, l_through = _matmul_flops(llm, batch_size * seq_len, upstream, skip=(head,))
    l_attn = _attention_flops(llm.config, l_through, batch_size, seq_len, causal=True)
    supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    head_flops = (6 if head.weight.requires_grad else 4 if upstream else 2) * head.weight.numel() * supervised
    parts = {"vision": v_flops + v_attn, "connector": c_flops, "llm": l_flops + l_attn + head_flops}
    parts["total"] = sum(parts.values())
    return parts
