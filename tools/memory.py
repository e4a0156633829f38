"""The `--dry_run` memory plan: what one training step will hold, per device, before it runs.

    plan = plan_memory(model, batch_size=16, seq_len=2048, gradient_checkpointing=True)
    print(format_plan(plan))

Counted from the built, frozen model itself, so every flag is reflected: weights by storage dtype
(a 4-bit weight is its packed half-byte per value plus its quantization state), gradients and
AdamW's two fp32 moments for trainable parameters only, and activations estimated analytically
from the configs of the towers for the given batch and sequence length (image tokens included).

The activation model is what PyTorch's autograd saves for backward in a pre-norm transformer
block (checked against `torch.autograd.graph.saved_tensors_hooks` on the tiny base): a linear
layer with a frozen weight saves nothing for itself, one whose weight (or LoRA) trains saves its
input; norms, attention (SDPA: q, k, v, output, log-sum-exp) and the MLP's activation save their
inputs whenever a gradient has to flow through them. A frozen vision tower runs under no_grad
and keeps nothing. With gradient checkpointing a block keeps only its input, and the peak adds
one block recomputed during backward. A training step computes logits only at the positions that
have a label (`supervised_tokens`, all of them unless given). Fused with the loss (model/loss.py),
the head keeps the gradient of its input from the forward and holds one chunk of logits at a
time; unfused, the loss keeps the fp32 log-softmax of the logits and adds, at the start of
backward, two more logits-sized fp32 gradients.

Both kinds of base are planned by this one arithmetic: tools/anatomy.py says where a model's
tower, connector and LLM are and how many tokens an image is (for a released VLM, from its config
and the processor's pixel budget: the plan then holds the largest image).

Not counted: the framework itself (CUDA context, kernels, Python), allocator fragmentation,
DeepSpeed/FSDP sharding (the plan is per device, unsharded), and data loading.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from model.loss import CHUNK_ELEMENTS
from patches import attention_implementation
from tools.anatomy import Anatomy, Stack, anatomy

_LAYER = re.compile(r"(?:^|\.)(?:layers|blocks)\.(\d+)\.")  # a block: `layers.3.` (`blocks.3.`: Qwen2-VL's tower)
# Linear layers by where their input comes from in a block (Llama, Qwen, Mistral, CLIP, SigLIP).
_ATTN_IN = {"q_proj", "k_proj", "v_proj", "qkv_proj", "qkv", "query_key_value", "c_attn", "Wqkv"}
_ATTN_OUT = {"o_proj", "out_proj", "dense", "proj"}  # its input is the attention output, already saved
_MLP_OUT = {"down_proj", "fc2", "dense_4h_to_h", "w2"}  # its input is the MLP's hidden [., i]
# Activations whose backward keeps two tensors of the MLP width rather than one.
_TWO_TENSOR_ACTS = {"quick_gelu"}


@dataclass
class MemoryPlan:
    batch_size: int
    seq_len: int  # tokens per sample, image tokens included
    image_tokens: int  # of those, per sample
    gradient_checkpointing: bool
    weights: dict[str, int] = field(default_factory=dict)  # bytes by storage kind
    gradients: int = 0
    optimizer: int = 0
    activations_no_ckpt: int = 0  # peak activation bytes, gradient checkpointing off
    activations_ckpt: int = 0  # and on
    saved_no_ckpt: int = 0  # of which autograd keeps at the end of the forward, checkpointing off
    saved_ckpt: int = 0  # and on
    frozen_tower_forward: int = 0  # a frozen tower's no_grad working set (transient, not kept)
    image: str = ""  # the image size assumed, in words
    notes: tuple[str, ...] = ()  # what the plan does not model of this model

    @property
    def activations(self) -> int:
        return self.activations_ckpt if self.gradient_checkpointing else self.activations_no_ckpt

    @property
    def weights_total(self) -> int:
        return sum(self.weights.values())

    @property
    def training_overhead(self) -> int:
        """What training adds on top of the loaded model: gradients, optimizer, activations."""
        return self.gradients + self.optimizer + self.activations

    @property
    def total(self) -> int:
        return self.weights_total + self.training_overhead


# --- weights ------------------------------------------------------------------------------------


def _quant_state_bytes(param, seen: set[int]) -> int:
    """Bytes of a 4-bit weight's quantization state (absmax, code book, nested absmax), counting
    each storage once: the code book is shared between layers."""
    total = 0
    for value in param.quant_state.as_dict(packed=True).values():
        if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in seen:
            seen.add(value.untyped_storage().data_ptr())
            total += value.untyped_storage().nbytes()
    return total


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Resident bytes of parameters and buffers by storage kind, each storage counted once."""
    out: dict[str, int] = {}
    seen: set[int] = set()

    def add(kind: str, nbytes: int) -> None:
        out[kind] = out.get(kind, 0) + nbytes

    scales = {}  # 8-bit row scales live on the weight before the first forward, on the module after
    for module in model.modules():
        state = getattr(module, "state", None)
        scb = getattr(getattr(module, "weight", None), "SCB", None)
        scb = scb if scb is not None else getattr(state, "SCB", None)
        if isinstance(scb, torch.Tensor):
            scales[id(module.weight)] = scb

    for tensor in [*model.parameters(), *model.buffers()]:
        # Tied weights share storage; meta tensors (a plan without weights) all sit at address 0.
        ptr = id(tensor) if tensor.is_meta else tensor.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        nbytes = tensor.untyped_storage().nbytes()
        quant_state = getattr(tensor, "quant_state", None)
        if quant_state is not None:  # packed: two 4-bit values per byte
            add(f"{quant_state.quant_type} 4-bit", nbytes + _quant_state_bytes(tensor, seen))
        elif tensor.dtype == torch.int8 and id(tensor) in scales:
            add("int8", nbytes + scales[id(tensor)].numel() * scales[id(tensor)].element_size())
        else:
            add(str(tensor.dtype).replace("torch.", ""), nbytes)
    return out


# --- activations --------------------------------------------------------------------------------


@dataclass
class _Block:
    """What training needs from one transformer block."""

    trains: bool = False  # any parameter inside it trains
    norms_train: int = 0  # norm weights that train
    full: set[str] = field(default_factory=set)  # roles whose base weight trains
    lora: list[tuple[str, int, int, float]] = field(default_factory=list)  # (role, in, r, dropout)
    frozen_lora: list[tuple[str, int, int, float]] = field(default_factory=list)  # --freeze_lora


def _role(leaf: str) -> str:
    if leaf in _ATTN_IN:
        return "attn_in"
    if leaf in _ATTN_OUT:
        return "attn_out"
    if leaf in _MLP_OUT:
        return "mlp_out"
    return "mlp_in"


def _blocks(tower: Stack) -> dict[int, _Block]:
    blocks: dict[int, _Block] = {}
    for name, param in tower.params:
        match = _LAYER.search(name)
        if match and param.requires_grad:
            block = blocks.setdefault(int(match.group(1)), _Block())
            block.trains = True
            if "lora_" in name:
                continue
            owner = name.rsplit(".", 1)[0].removesuffix(".base_layer")
            leaf = owner.rsplit(".", 1)[-1]
            if "norm" in leaf:
                block.norms_train += 1
            elif name.endswith("weight"):
                block.full.add(_role(leaf))
    for name, module in tower.modules:
        match = _LAYER.search(name + ".")
        lora_a = getattr(module, "lora_A", None)
        if not (match and isinstance(lora_a, nn.ModuleDict) and len(lora_a)):
            continue
        for adapter, a in lora_a.items():
            dropout = module.lora_dropout[adapter]
            p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
            entry = (_role(name.rsplit(".", 1)[-1]), a.in_features, a.out_features, p)
            block = blocks.setdefault(int(match.group(1)), _Block())
            (block.lora if a.weight.requires_grad else block.frozen_lora).append(entry)
    return blocks


@dataclass
class _Shape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    gated: bool  # SwiGLU-style MLP (gate * up)
    rms_norm: bool  # RMSNorm (fp32 copy + rstd) vs LayerNorm (input + mean + rstd)
    act_tensors: int  # tensors of the MLP width the activation keeps
    eager: bool  # eager attention keeps the [heads, L, L] probabilities


def _shape(tower: Stack) -> _Shape:
    config = tower.config
    hidden = config.hidden_size
    heads = config.num_attention_heads
    names = {n.rsplit(".", 1)[-1] for n, _ in tower.modules}
    act = getattr(config, "hidden_act", "gelu")
    return _Shape(
        hidden=hidden,
        intermediate=config.intermediate_size,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or hidden // heads,
        gated="gate_proj" in names or "gate_up_proj" in names,
        rms_norm=any(type(m).__name__.endswith("RMSNorm") for _, m in tower.modules),
        act_tensors=2 if act in _TWO_TENSOR_ACTS else 1,
        eager=attention_implementation(config) == "eager",
    )


def _block_bytes(
    s: _Shape, b: _Block, grad_flows: bool, seq: int, act: int, mask: int, padded: bool = False
) -> float:
    """Bytes one block saves for backward, per token. `grad_flows`: a gradient must pass through
    the block (something before it trains), so its norms, attention and MLP keep their inputs
    even where no weight of its own trains. `act`: bytes per activation element; `mask`: bytes
    per element of a dropout mask (a float tensor on CPU, a bool on CUDA)."""
    h, i = s.hidden, s.intermediate
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    total = 0.0
    if grad_flows:
        norm = 4 * h + 4 if s.rms_norm else act * h + 8
        total += 2 * norm
        total += act * (2 * q + 2 * kv) + 4 * s.heads  # q, k, v, output; log-sum-exp
        if padded:  # SDPA turns the boolean padding mask into a float one, per call: [B, 1, L, L]
            total += act * seq
        if s.eager:
            total += s.heads * seq * (4 + (act if act != 4 else 0))  # fp32 softmax (+ its cast)
        total += act * (3 * i if s.gated else s.act_tensors * i)
        # A frozen adapter still runs its dropout in training, and the gradient passes through it.
        total += mask * sum(in_features for _, in_features, _, p in b.frozen_lora if p > 0)
    total += act * h * b.norms_train if s.rms_norm else 0
    # A linear layer that trains keeps its input; q/k/v share one, as do gate/up.
    needs_input = set(b.full)
    for role, in_features, r, p in b.lora:
        total += act * r  # lora_A's output, kept for lora_B
        if p > 0:  # its own dropout: the dropped copy and the mask
            total += (act + mask) * in_features
        else:
            needs_input.add(role)
    inputs = {"attn_in": h, "attn_out": q if s.eager else 0, "mlp_in": h, "mlp_out": i}
    total += act * sum(inputs[r] for r in needs_input)
    return total


def _block_backward_working(s: _Shape, act: int) -> float:
    """Per token, the gradients alive inside one block at the widest point of its backward: the
    incoming and the residual gradient (hidden-sized) and, in the MLP, the gradient of its hidden
    plus one per factor of the product (gate * up: three; act(fc1): two)."""
    return act * (2 * s.hidden + (3 if s.gated else 2) * s.intermediate)


def _vision_bytes(a: Anatomy, s: _Shape, blocks: dict[int, _Block], images: int, ckpt: bool, act: int, mask: int):
    """(kept, recompute working) for a vision tower that trains."""
    tokens = images * a.tower_tokens
    embeddings_train = any(p.requires_grad for n, p in a.vision.params if "embed" in n)  # embeddings, patch_embed
    first = 0 if embeddings_train else min(blocks, default=0)
    num_layers = a.vision_layers
    kept = 0.0
    per_block = []
    for index in range(num_layers):
        per_block.append(_block_bytes(s, blocks.get(index, _Block()), index >= first, 0, act, mask) * tokens)
    if embeddings_train:
        kept += act * images * a.pixel_values  # the patch convolution keeps the pixels
    if any("pre_layrnorm" in n for n, _ in a.vision.modules):
        kept += (act * s.hidden + 8) * tokens
    working = 0.0
    if ckpt:
        kept += act * s.hidden * tokens * num_layers  # each block's input
        working = max(per_block, default=0) + _block_backward_working(s, act) * tokens
    else:
        kept += sum(per_block)
    return kept, working


def plan_memory(
    model,
    batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool,
    images_per_sample: int = 1,
    supervised_tokens: int | None = None,
    padded: bool | None = None,
    fused_loss: bool | None = None,
) -> MemoryPlan:
    """The memory one device needs to train `model` (built and frozen) on batches of
    `batch_size` samples of `seq_len` tokens each, image tokens included (`--max_length` counts
    them: a sample of T text tokens and k images is T + k * model.num_image_tokens long).

    `supervised_tokens`: positions of a batch whose next token has a label; a training step
    computes the logits and the loss there only (default: every position, an upper bound).
    `padded`: whether batches are padded (default: batch_size > 1, as the collator pads).
    `fused_loss`: whether the head runs fused with the loss (model/loss.py); default: as the
    model decided on its first training step, or, before one, wherever it can (a plain linear
    head). A family that changes its logits after the head (Gemma's soft-capping) is found out
    on the first step and keeps the unfused path: plan it with fused_loss=False."""
    a = anatomy(model)
    image_tokens = images_per_sample * a.image_tokens
    if seq_len <= image_tokens:
        raise ValueError(
            f"seq_len {seq_len} leaves no room for text after {images_per_sample} image(s) of "
            f"{a.image_tokens} tokens: every sample would be dropped. Raise --max_length."
        )
    plan = MemoryPlan(batch_size, seq_len, image_tokens, gradient_checkpointing, image=a.image, notes=a.notes)
    act = _plan_fixed(model, plan)
    mask = 1 if next(model.parameters()).device.type == "cuda" else act
    tokens = batch_size * seq_len
    vision_kept, connector, upstream_trains = _plan_front(a, plan, batch_size * images_per_sample, act, mask)

    # The LLM: its blocks, then the final norm, the head and the loss.
    llm = a.llm
    shape = _shape(llm)
    padded = batch_size > 1 if padded is None else padded  # the collator pads to the longest sample
    padded = padded or a.prefix_lm  # PaliGemma's prefix mask is a float [B, 1, L, L] either way
    per_block, grad_reaches_head = _llm_blocks(a, shape, upstream_trains, seq_len, tokens, act, mask, padded)
    rows = tokens if supervised_tokens is None else supervised_tokens  # where logits are computed
    if fused_loss is None:
        fused_loss = model.fused_loss
    if fused_loss is None:  # not trained yet: fused wherever it may be
        fused_loss = model.head_may_be_plain()
    head_bytes, loss_kept, loss_working = _head_and_loss(a, shape, grad_reaches_head, tokens, rows, act, fused_loss)
    padding_mask = batch_size * seq_len * seq_len if padded else 0  # the boolean [B, 1, L, L]
    rotary = any("rotary" in n for n, _ in llm.modules)
    positions = 2 * act * shape.head_dim * seq_len if rotary else 0  # cos, sin: one row per position

    outside = connector + padding_mask + positions  # kept either way
    # Without checkpointing: everything kept; the peak is at the start of backward, where the
    # loss's gradients join it.
    kept = sum(per_block) + vision_kept[False][0] + outside + head_bytes + loss_kept
    plan.saved_no_ckpt = int(kept)
    plan.activations_no_ckpt = int(max(kept + loss_working, plan.frozen_tower_forward))
    # With checkpointing: block inputs kept. Two candidate peaks: the start of backward (as
    # above), and a block recomputed during backward (the head's tensors are freed by then).
    kept = act * shape.hidden * tokens * llm.config.num_hidden_layers + vision_kept[True][0] + outside
    recompute = max(per_block, default=0) + _block_backward_working(shape, act) * tokens
    plan.saved_ckpt = int(kept + head_bytes + loss_kept)
    plan.activations_ckpt = int(
        max(
            kept + head_bytes + loss_kept + loss_working,
            kept + recompute,
            kept + vision_kept[True][1],
            plan.frozen_tower_forward,
        )
    )
    return plan


def _plan_fixed(model, plan: MemoryPlan) -> int:
    """Weights, gradients and AdamW states into `plan`; returns the bytes per activation element
    (the frozen weights' float dtype: what the forward computes in)."""
    params = list(model.named_parameters())
    trainable = [p for _, p in params if p.requires_grad]
    plan.weights = weight_bytes(model)
    plan.gradients = sum(p.numel() * p.element_size() for p in trainable)
    plan.optimizer = sum(2 * 4 * p.numel() for p in trainable)  # AdamW: exp_avg, exp_avg_sq in fp32
    float_dtypes = [p.dtype for _, p in params if p.dtype.is_floating_point and not p.requires_grad]
    return torch.finfo(float_dtypes[0] if float_dtypes else torch.float32).bits // 8


def _plan_front(a: Anatomy, plan: MemoryPlan, images: int, act: int, mask: int):
    """The vision tower and the connector, in front of the LLM: ({checkpointing: (kept, recompute
    working)} of a training tower, the connector's kept bytes, whether anything there trains).
    A frozen tower's transient no_grad forward goes into `plan.frozen_tower_forward`."""
    vision_trains, connector_trains = a.vision.trains(), a.connector.trains()
    vshape = _shape(a.vision)
    if vision_trains:
        vision_blocks = _blocks(a.vision)
        vision_kept = {ckpt: _vision_bytes(a, vshape, vision_blocks, images, ckpt, act, mask) for ckpt in (False, True)}
    else:
        vision_kept = {False: (0.0, 0.0), True: (0.0, 0.0)}
        patches = images * a.tower_tokens
        plan.frozen_tower_forward = int(
            act * patches * ((a.vision_layers + 1) * vshape.hidden + 4 * vshape.hidden + 2 * vshape.intermediate)
        )
    # What the connector keeps: nothing unless it trains or a gradient passes through it.
    connector = a.connector_saved(connector_trains, act) * images if connector_trains or vision_trains else 0.0
    return vision_kept, connector, vision_trains or connector_trains


def _llm_blocks(a: Anatomy, shape: _Shape, upstream_trains: bool, seq_len: int, tokens: int, act: int, mask: int,
                padded: bool) -> tuple[list[float], bool]:
    """What each LLM block keeps for backward (bytes), and whether a gradient reaches the head."""
    config = a.llm.config
    blocks = _blocks(a.llm)
    embeddings_train = a.input_embeddings.weight.requires_grad
    first = 0 if (upstream_trains or embeddings_train) else min(blocks, default=config.num_hidden_layers)
    per_block = [
        _block_bytes(shape, blocks.get(index, _Block()), index >= first, seq_len, act, mask, padded) * tokens
        for index in range(config.num_hidden_layers)
    ]
    grad_reaches_head = first < config.num_hidden_layers or any(
        p.requires_grad for n, p in a.llm.params if not _LAYER.search(n)
    )
    return per_block, grad_reaches_head


def _head_and_loss(a: Anatomy, shape: _Shape, grad_reaches_head: bool, tokens: int, rows: int, act: int,
                   fused_loss: bool) -> tuple[float, float, float]:
    """(kept by the final norm, the head and the embedding lookup; kept by the loss; the loss's
    working set at the start of backward), with logits at `rows` positions."""
    head_bytes = 0.0
    if grad_reaches_head:
        head_bytes += (4 * shape.hidden + 4) * tokens  # final norm
    final_norm_trains = any(p.requires_grad for n, p in a.llm.params if "norm" in n and not _LAYER.search(n))
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


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1024
    raise AssertionError


def format_plan(plan: MemoryPlan) -> str:
    text = plan.seq_len - plan.image_tokens
    lines = [
        f"memory plan per device: batch {plan.batch_size} x {plan.seq_len} tokens "
        f"({plan.image_tokens} image + {text} text), AdamW, "
        f"gradient checkpointing {'on' if plan.gradient_checkpointing else 'off'}",
        f"images planned at {plan.image}",
        f"{'item':<38} {'bytes':>12}",
    ]
    for kind, nbytes in sorted(plan.weights.items(), key=lambda kv: -kv[1]):
        suffix = " (+quant state)" if "4-bit" in kind else " (+row scales)" if kind == "int8" else ""
        lines.append(f"{'weights ' + kind + suffix:<38} {_size(nbytes):>12}")
    lines += [
        f"{'gradients (trainable only)':<38} {_size(plan.gradients):>12}",
        f"{'AdamW states (2 x fp32, trainable)':<38} {_size(plan.optimizer):>12}",
        f"{'activations, checkpointing off':<38} {_size(plan.activations_no_ckpt):>12}"
        + ("  <" if not plan.gradient_checkpointing else ""),
        f"{'activations, checkpointing on':<38} {_size(plan.activations_ckpt):>12}"
        + ("  <" if plan.gradient_checkpointing else ""),
    ]
    if plan.frozen_tower_forward:
        lines.append(f"{'  frozen tower forward (no_grad)':<38} {_size(plan.frozen_tower_forward):>12}")
    lines.append(f"{'total':<38} {_size(plan.total):>12}")
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)
