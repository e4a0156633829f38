"""What one transformer block keeps for backward, per token: the unit of the activation plan.

The model is what PyTorch's autograd saves for backward in a pre-norm transformer block (checked
against `torch.autograd.graph.saved_tensors_hooks` on the tiny base): a linear layer with a
frozen weight saves nothing for itself, one whose weight (or LoRA) trains saves its input; norms,
attention (SDPA: q, k, v, output, log-sum-exp) and the MLP's activation save their inputs
whenever a gradient has to flow through them. Stacks of these blocks (the tower, the LLM) are
summed up in model/memory_activations.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from model.anatomy import Stack
from model.components import layer_index
from patches import attention_implementation

# Linear layers by where their input comes from in a block (Llama, Qwen, Mistral, CLIP, SigLIP).
_ATTN_IN = {"q_proj", "k_proj", "v_proj", "qkv_proj", "qkv", "query_key_value", "c_attn", "Wqkv"}
_ATTN_OUT = {"o_proj", "out_proj", "dense", "proj"}  # its input is the attention output, already saved
_MLP_OUT = {"down_proj", "fc2", "dense_4h_to_h", "w2"}  # its input is the MLP's hidden [., i]
# Activations whose backward keeps two tensors of the MLP width rather than one.
_TWO_TENSOR_ACTS = {"quick_gelu"}


@dataclass
class Block:
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


def blocks_by_index(tower: Stack) -> dict[int, Block]:
    """What training needs from each block of `tower` that holds a trainable parameter or an
    adapter, by block index (blocks absent from it train nothing)."""
    blocks: dict[int, Block] = {}
    for name, param in tower.params:
        index = layer_index(name)
        if index is not None and param.requires_grad:
            block = blocks.setdefault(index, Block())
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
        index = layer_index(name)
        lora_a = getattr(module, "lora_A", None)
        if not (index is not None and isinstance(lora_a, nn.ModuleDict) and len(lora_a)):
            continue
        for adapter, a in lora_a.items():
            dropout = module.lora_dropout[adapter]
            p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
            entry = (_role(name.rsplit(".", 1)[-1]), a.in_features, a.out_features, p)
            block = blocks.setdefault(index, Block())
            (block.lora if a.weight.requires_grad else block.frozen_lora).append(entry)
    return blocks


@dataclass
class Shape:
    """A stack's block dimensions, read from its config and module names."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    gated: bool  # SwiGLU-style MLP (gate * up)
    rms_norm: bool  # RMSNorm (fp32 copy + rstd) vs LayerNorm (input + mean + rstd)
    act_tensors: int  # tensors of the MLP width the activation keeps
    eager: bool  # eager attention keeps the [heads, L, L] probabilities


def stack_shape(tower: Stack) -> Shape:
    config = tower.config
    hidden = config.hidden_size
    heads = config.num_attention_heads
    names = {n.rsplit(".", 1)[-1] for n, _ in tower.modules}
    act = getattr(config, "hidden_act", "gelu")
    return Shape(
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


def block_saved_bytes(
    s: Shape, b: Block, grad_flows: bool, seq: int, act: int, mask: int, padded: bool = False
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


def block_backward_bytes(s: Shape, act: int) -> float:
    """Per token, the gradients alive inside one block at the widest point of its backward: the
    incoming and the residual gradient (hidden-sized) and, in the MLP, the gradient of its hidden
    plus one per factor of the product (gate * up: three; act(fc1): two)."""
    return act * (2 * s.hidden + (3 if s.gated else 2) * s.intermediate)
