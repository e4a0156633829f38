"""The activations of one training step: the blocks of model/memory_blocks.py summed over the
towers, plus the connector, the head and the loss, at their peak.

A frozen vision tower runs under no_grad and keeps nothing. With gradient checkpointing a block
keeps only its input, and the peak adds one block recomputed during backward. A training step
computes logits only at the positions that have a label (`rows`). Fused with the loss
(model/loss.py), the head keeps the gradient of its input from the forward and holds one chunk of
logits at a time; unfused, the loss keeps the fp32 log-softmax of the logits and adds, at the
start of backward, two more logits-sized fp32 gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.anatomy import Anatomy
from model.components import layer_index
from model.loss import CHUNK_ELEMENTS
from model.memory_blocks import (
    Block,
    Shape,
    block_backward_bytes,
    block_saved_bytes,
    blocks_by_index,
    stack_shape,
)


@dataclass
class ActivationBytes:
    no_ckpt: int  # peak activation bytes, gradient checkpointing off
    ckpt: int  # and on
    saved_no_ckpt: int  # of which autograd keeps at the end of the forward, checkpointing off
    saved_ckpt: int  # and on
    frozen_tower_forward: int  # a frozen tower's no_grad working set (transient, not kept)


def activation_bytes(
    a: Anatomy,
    batch_size: int,
    seq_len: int,
    images_per_sample: int,
    rows: int,
    padded: bool,
    fused_loss: bool,
    act: int,
    mask: int,
) -> ActivationBytes:
    """The peak activations of a step on `batch_size` samples of `seq_len` tokens, with logits at
    `rows` positions. `act`: bytes per activation element; `mask`: bytes per element of a
    dropout mask (a float tensor on CPU, a bool on CUDA)."""
    tokens = batch_size * seq_len
    vision_kept, connector, upstream_trains, frozen_tower_forward = _front(
        a, batch_size * images_per_sample, act, mask
    )

    # The LLM: its blocks, then the final norm, the head and the loss.
    llm = a.llm
    shape = stack_shape(llm)
    padded = padded or a.prefix_lm  # PaliGemma's prefix mask is a float [B, 1, L, L] either way
    per_block, grad_reaches_head = _llm_blocks(a, shape, upstream_trains, seq_len, tokens, act, mask, padded)
    head_bytes, loss_kept, loss_working = _head_and_loss(a, shape, grad_reaches_head, tokens, rows, act, fused_loss)
    padding_mask = batch_size * seq_len * seq_len if padded else 0  # the boolean [B, 1, L, L]
    rotary = any("rotary" in n for n, _ in llm.modules)
    positions = 2 * act * shape.head_dim * seq_len if rotary else 0  # cos, sin: one row per position

    outside = connector + padding_mask + positions  # kept either way
    # Without checkpointing: everything kept; the peak is at the start of backward, where the
    # loss's gradients join it.
    kept_no_ckpt = sum(per_block) + vision_kept[False][0] + outside + head_bytes + loss_kept
    # With checkpointing: block inputs kept. Two candidate peaks: the start of backward (as
    # above), and a block recomputed during backward (the head's tensors are freed by then).
    kept = act * shape.hidden * tokens * llm.config.num_hidden_layers + vision_kept[True][0] + outside
    recompute = max(per_block, default=0) + block_backward_bytes(shape, act) * tokens
    return ActivationBytes(
        no_ckpt=int(max(kept_no_ckpt + loss_working, frozen_tower_forward)),
        ckpt=int(
            max(
                kept + head_bytes + loss_kept + loss_working,
                kept + recompute,
                kept + vision_kept[True][1],
                frozen_tower_forward,
            )
        ),
        saved_no_ckpt=int(kept_no_ckpt),
        saved_ckpt=int(kept + head_bytes + loss_kept),
        frozen_tower_forward=frozen_tower_forward,
    )


def _vision_bytes(a: Anatomy, s: Shape, blocks: dict[int, Block], images: int, ckpt: bool, act: int, mask: int):
    """(kept, recompute working) for a vision tower that trains."""
    tokens = images * a.tower_tokens
    embeddings_train = any(p.requires_grad for n, p in a.vision.params if "embed" in n)  # embeddings, patch_embed
    first = 0 if embeddings_train else min(blocks, default=0)
    num_layers = a.vision_layers
    kept = 0.0
    per_block = []
    for index in range(num_layers):
        per_block.append(block_saved_bytes(s, blocks.get(index, Block()), index >= first, 0, act, mask) * tokens)
    if embeddings_train:
        kept += act * images * a.pixel_values  # the patch convolution keeps the pixels
    if any("pre_layrnorm" in n for n, _ in a.vision.modules):
        kept += (act * s.hidden + 8) * tokens
    working = 0.0
    if ckpt:
        kept += act * s.hidden * tokens * num_layers  # each block's input
        working = max(per_block, default=0) + block_backward_bytes(s, act) * tokens
    else:
        kept += sum(per_block)
    return kept, working


def _front(a: Anatomy, images: int, act: int, mask: int):
    """The vision tower and the connector, in front of the LLM: ({checkpointing: (kept, recompute
    working)} of a training tower, the connector's kept bytes, whether anything there trains, a
    frozen tower's transient no_grad forward)."""
    vision_trains, connector_trains = a.vision.trains(), a.connector.trains()
    vshape = stack_shape(a.vision)
    frozen_tower_forward = 0
    if vision_trains:
        vision_blocks = blocks_by_index(a.vision)
        vision_kept = {ckpt: _vision_bytes(a, vshape, vision_blocks, images, ckpt, act, mask) for ckpt in (False, True)}
    else:
        vision_kept = {False: (0.0, 0.0), True: (0.0, 0.0)}
        patches = images * a.tower_tokens
        frozen_tower_forward = int(
            act * patches * ((a.vision_layers + 1) * vshape.hidden + 4 * vshape.hidden + 2 * vshape.intermediate)
        )
    # What the connector keeps: nothing unless it trains or a gradient passes through it.
    connector = a.connector_saved(connector_trains, act) * images if connector_trains or vision_trains else 0.0
    return vision_kept, connector, vision_trains or connector_trains, frozen_tower_forward


def _llm_blocks(a: Anatomy, shape: Shape, upstream_trains: bool, seq_len: int, tokens: int, act: int, mask: int,
                padded: bool) -> tuple[list[float], bool]:
    """What each LLM block keeps for backward (bytes), and whether a gradient reaches the head."""
    config = a.llm.config
    blocks = blocks_by_index(a.llm)
    embeddings_train = a.input_embeddings.weight.requires_grad
    first = 0 if (upstream_trains or embeddings_train) else min(blocks, default=config.num_hidden_layers)
    per_block = [
        block_saved_bytes(shape, blocks.get(index, Block()), index >= first, seq_len, act, mask, padded) * tokens
        for index in range(config.num_hidden_layers)
    ]
    grad_reaches_head = first < config.num_hidden_layers or any(
        p.requires_grad for n, p in a.llm.params if layer_index(n) is None
    )
    return per_block, grad_reaches_head


def _head_and_loss(a: Anatomy, shape: Shape, grad_reaches_head: bool, tokens: int, rows: int, act: int,
                   fused_loss: bool) -> tuple[float, float, float]:
    """(kept by the final norm, the head and the embedding lookup; kept by the loss; the loss's
    working set at the start of backward), with logits at `rows` positions."""
    head_bytes = 0.0
    if grad_reaches_head:
        head_bytes += (4 * shape.hidden + 4) * tokens  # final norm
    final_norm_trains = any(p.requires_grad for n, p in a.llm.params if "norm" in n and layer_index(n) is None)
    head_trains = a.output_embeddings.weight.requires_grad
    embeddings_train = a.input_embeddings.weight.requires_grad
    head_bytes += act * shape.hidden * tokens * final_norm_trains
    head_bytes += 8 * tokens * embeddings_train  # the embedding lookup keeps its int64 indices
    vocab = a.llm.config.vocab_size
    if fused_loss:
        # model/loss.py: the gradient of the head's input is kept from the forward; the logits
        # exist one chunk at a time (fp32, beside the compute dtype's logits or gradient), with
        # a [V, D] product per chunk when the head trains in a 16-bit dtype.
        chunk = min(rows, max(1, CHUNK_ELEMENTS // vocab))
        loss_kept = act * shape.hidden * rows * grad_reaches_head
        loss_working = act * shape.hidden * rows + chunk * vocab * (4 + (act if act != 4 else 0))
        loss_working += act * vocab * shape.hidden if head_trains and act != 4 else 0
    else:
        head_bytes += act * shape.hidden * rows * head_trains  # the head's input, for its weight gradient
        loss_kept = 4 * rows * vocab + 8 * rows  # fp32 log-probabilities, int64 labels
        loss_working = max(
            act * rows * vocab + (4 * rows * vocab if act != 4 else 0),  # logits (+ fp32 copy)
            2 * 4 * rows * vocab,  # backward: d(nll) and d(log_softmax), both fp32
        )
    return head_bytes, loss_kept, loss_working
