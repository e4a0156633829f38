"""The `--dry_run` memory plan: what one training step will hold, per device, before it runs.

    plan = plan_memory(model, batch_size=16, seq_len=2048, gradient_checkpointing=True)
    print(format_plan(plan))

Counted from the built, frozen model itself, so every flag is reflected: weights by storage dtype
(a 4-bit weight is its packed half-byte per value plus its quantization state), gradients and
AdamW's two fp32 moments for trainable parameters only (here), and activations estimated
analytically from the configs of the towers for the given batch and sequence length, image tokens
included (model/memory_activations.py, block by block in model/memory_blocks.py).

Both kinds of base are planned by this one arithmetic: model/anatomy.py says where a model's
tower, connector and LLM are and how many tokens an image is (for a released VLM, from its config
and the processor's pixel budget: the plan then holds the largest image).

Not counted: the framework itself (CUDA context, kernels, Python), allocator fragmentation,
DeepSpeed/FSDP sharding (the plan is per device, unsharded), and data loading.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from model.anatomy import anatomy
from model.memory_activations import activation_bytes
from model.quantization import is_bitsandbytes_weight


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
    packed: bool = False  # rows of whole samples (--packing true), each seq_len tokens

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
    """Bytes of a 4-bit weight's quantization state (absmax, code book, and a double-quantized
    one's offset, nested absmax and code book), each storage counted once (a code book may be
    shared between layers). Read from the state's own tensors: `as_dict()` builds copies, whose
    addresses are freed and reused, so counting those undercounted by a varying amount."""
    state = param.quant_state
    tensors = [state.absmax, state.code, state.offset]
    if state.nested:
        tensors += [state.state2.absmax, state.state2.code]
    total = 0
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in seen:
            seen.add(tensor.untyped_storage().data_ptr())
            total += tensor.untyped_storage().nbytes()
    return total


def planned_quantized_bytes(param) -> tuple[str, int] | None:
    """(kind, bytes) a bitsandbytes weight of a model without weights will hold once quantized
    (model/quantization.py `quantize_without_weights`), or None for any other tensor. The layout is
    bitsandbytes': 4-bit packs two values a byte and keeps an absmax per block (double-quantized:
    a byte each, with an fp32 absmax per 256 blocks, its 256-value code book and an fp32 offset)
    and its type's 16-value code book; 8-bit, a byte a value and an fp32 scale per row."""
    if not (param.is_meta and param.dtype.is_floating_point and is_bitsandbytes_weight(param)):
        return None
    numel = param.numel()
    if hasattr(param, "quant_type"):  # bnb Params4bit, not yet quantized
        blocks = -(-numel // param.blocksize)
        if param.compress_statistics:
            absmax = blocks + 4 * (-(-blocks // 256) + 256 + 1)
        else:
            absmax = 4 * blocks
        return f"{param.quant_type} 4-bit", -(-numel // 2) + absmax + 4 * 16
    if hasattr(param, "has_fp16_weights"):  # bnb Int8Params
        return "int8", numel + 4 * param.shape[0]
    return None


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
        planned = planned_quantized_bytes(tensor)
        if planned is not None:  # built without weights (--dry_run): what quantizing them will store
            add(planned[0], planned[1])
        elif quant_state is not None:  # packed: two 4-bit values per byte
            add(f"{quant_state.quant_type} 4-bit", nbytes + _quant_state_bytes(tensor, seen))
        elif tensor.dtype == torch.int8 and id(tensor) in scales:
            add("int8", nbytes + scales[id(tensor)].numel() * scales[id(tensor)].element_size())
        else:
            add(str(tensor.dtype).replace("torch.", ""), nbytes)
    return out


def plan_memory(
    model,
    batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool,
    images_per_sample: int = 1,
    supervised_tokens: int | None = None,
    padded: bool | None = None,
    fused_loss: bool | None = None,
    packed: bool = False,
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
    on the first step and keeps the unfused path: plan it with fused_loss=False.
    `packed`: rows of whole samples (--packing true), `batch_size` rows of `seq_len` tokens, with
    the block-diagonal mask transformers builds for them (as a padded batch's, [B, 1, L, L])."""
    a = anatomy(model)
    image_tokens = images_per_sample * a.image_tokens
    if seq_len <= image_tokens:
        raise ValueError(
            f"seq_len {seq_len} leaves no room for text after {images_per_sample} image(s) of "
            f"{a.image_tokens} tokens: every sample would be dropped. Raise --max_length."
        )
    plan = MemoryPlan(batch_size, seq_len, image_tokens, gradient_checkpointing, image=a.image, notes=a.notes,
                      packed=packed)
    act = _plan_fixed(model, plan)
    mask = 1 if next(model.parameters()).device.type == "cuda" else act
    if fused_loss is None:
        fused_loss = model.fused_loss
    if fused_loss is None:  # not trained yet: fused wherever it may be
        fused_loss = model.head_may_be_plain()
    activations = activation_bytes(
        a,
        batch_size,
        seq_len,
        images_per_sample,
        rows=batch_size * seq_len if supervised_tokens is None else supervised_tokens,  # logits at labels only
        # The collator pads to the longest sample; a packed row's mask is as large.
        padded=packed or (batch_size > 1 if padded is None else padded),
        fused_loss=fused_loss,
        act=act,
        mask=mask,
    )
    plan.activations_no_ckpt, plan.activations_ckpt = activations.no_ckpt, activations.ckpt
    plan.saved_no_ckpt, plan.saved_ckpt = activations.saved_no_ckpt, activations.saved_ckpt
    plan.frozen_tower_forward = activations.frozen_tower_forward
    return plan


def _plan_fixed(model, plan: MemoryPlan) -> int:
    """Weights, gradients and AdamW states into `plan`; returns the bytes per activation element
    (the frozen weights' float dtype: what the forward computes in)."""
    params = list(model.named_parameters())
    trainable = [p for _, p in params if p.requires_grad]
    plan.weights = weight_bytes(model)
    plan.gradients = sum(p.numel() * p.element_size() for p in trainable)
    plan.optimizer = sum(2 * 4 * p.numel() for p in trainable)  # AdamW: exp_avg, exp_avg_sq in fp32
    float_dtypes = [p.dtype for _, p in params
                    if p.dtype.is_floating_point and not p.requires_grad and planned_quantized_bytes(p) is None]
    return torch.finfo(float_dtypes[0] if float_dtypes else torch.float32).bits // 8


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1024
    raise AssertionError


def format_plan(plan: MemoryPlan) -> str:
    text = plan.seq_len - plan.image_tokens
    rows = "packed rows (several whole samples each, block-diagonal mask)" if plan.packed else "batch"
    lines = [
        f"memory plan per device: {rows} {plan.batch_size} x {plan.seq_len} tokens "
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
