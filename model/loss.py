"""The LM head and its cross-entropy fused and chunked: a training step never holds [N, V] logits.

At a real vocabulary the loss is the largest activation of a VLM step: Qwen2.5's 151,936 words
at 5,272 labelled positions are 3.2 GB per fp32 copy, and the unfused path keeps three (the
upcast logits, the log-probabilities, their gradient). Here the rows are taken a chunk at a time:
logits [C, V], the chunk's loss, and at once its gradients, d loss / d logits = softmax - one-hot,
multiplied into the gradients of the hidden states and of the head's weight. The backward then
only scales what the forward computed: no logits are kept and none are recomputed, so the step's
FLOPs are the unfused path's (the same three matmuls) and its memory is one chunk's.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from constants import IGNORE_INDEX

# Logits computed at once: [C, V] with C = CHUNK_ELEMENTS // V rows (220 at a 152k vocabulary:
# 128 MiB in fp32), and every row in one chunk at a small vocabulary.
CHUNK_ELEMENTS = 2**25


class LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of cross_entropy(hidden @ weight.T + bias, labels), divided by `divisor` (a
    0-dim fp32 tensor: the labelled items); label -100 is ignored."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_rows: int, divisor):
        # hidden [N, D], weight [V, D], bias [V] or None, labels [N]
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        # Summed over the chunks in fp32, as one matmul over every row accumulates.
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if needs_bias else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # The model passes labelled rows only: then no chunk needs its ignored rows zeroed.
        any_ignored = bool((labels == IGNORE_INDEX).any())
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            total += _chunk(
                hidden[rows], labels[rows], weight, bias, divisor,
                None if grad_hidden is None else grad_hidden[rows], grad_weight, grad_bias, any_ignored,
            )
        # grad_hidden is an activation of this step (saved-tensor hooks may offload it);
        # grad_weight and grad_bias become the parameters' .grad as they are: gradients
        # allocated early, so kept on ctx, outside what autograd counts as saved.
        ctx.save_for_backward(grad_hidden)
        ctx.param_grads = (grad_weight, grad_bias)
        ctx.param_dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total / divisor

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        (grad_weight, grad_bias), (weight_dtype, bias_dtype) = ctx.param_grads, ctx.param_dtypes
        ctx.param_grads = None
        # The gradients already hold 1 / divisor (applied in fp32, before a 16-bit cast rounds
        # them). grad_total is 1 for a plain loss; the gradient-accumulation divisor or an fp16
        # loss scale otherwise. In place: these buffers are this backward's alone.
        for grad in (grad_hidden, grad_weight, grad_bias):
            if grad is not None:
                grad.mul_(grad_total.to(grad.dtype))
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight_dtype),
            None if grad_bias is None else grad_bias.to(bias_dtype),
            None,
            None,
            None,
        )


def _chunk(h, y, weight, bias, divisor, grad_h, grad_weight, grad_bias, any_ignored: bool) -> torch.Tensor:
    """One chunk of rows, h [C, D] and y [C]: returns its summed loss, writes its input gradient
    into grad_h [C, D] and adds its parameter gradients to grad_weight [V, D] and grad_bias [V]
    (each where not None), those of the loss divided by `divisor`. Its [C, V] logits die with this
    call, before the next chunk's exist. `any_ignored`: whether some label in the batch is -100
    (else no row needs zeroing)."""
    logits = nn.functional.linear(h, weight, bias)  # [C, V], in the head's compute dtype
    compute_dtype = logits.dtype
    logits = logits.float()  # the loss in fp32, as transformers' ForCausalLMLoss upcasts
    labelled = y != IGNORE_INDEX
    target = y.masked_fill(~labelled, 0)[:, None]  # [C, 1]
    # log-sum-exp and softmax in place: torch.logsumexp would allocate two more [C, V].
    logits -= logits.amax(dim=-1, keepdim=True)  # shifted: exp cannot overflow
    picked = logits.gather(1, target)  # [C, 1]
    sum_exp = logits.exp_().sum(dim=-1, keepdim=True)  # [C, 1]; logits hold exp(shifted)
    loss = ((sum_exp.log() - picked).squeeze(1) * labelled).sum()
    if grad_h is None and grad_weight is None and grad_bias is None:
        return loss
    # d loss / d logits = (softmax - one-hot) / divisor on labelled rows, 0 on the others: the
    # logits become their gradient. Divided here, in fp32 and in the same pass: after the cast to
    # a 16-bit compute dtype, the division would round the hidden states' gradient a second time.
    grad = logits.div_(sum_exp * divisor)
    grad.scatter_add_(1, target, (-1.0 / divisor).expand(target.shape))
    if any_ignored:
        grad.mul_(labelled[:, None])
    grad = grad.to(compute_dtype)
    # Under autocast these matmuls run in the compute dtype as the head's did (the fp32 weight
    # cast once, from autocast's cache); without it, hidden and weight share one dtype.
    if grad_h is not None:
        grad_h.copy_(grad @ weight)  # [C, D]
    if grad_weight is not None and compute_dtype == torch.float32:
        grad_weight.addmm_(grad.T, h)  # [V, D]
    elif grad_weight is not None:
        grad_weight += grad.T @ h  # a [V, D] product in the compute dtype
    if grad_bias is not None:
        grad_bias += grad.float().sum(0)
    return loss


def linear_cross_entropy(hidden, head: nn.Linear, labels, num_items_in_batch=None) -> torch.Tensor:
    """The mean cross-entropy of `head(hidden)` against `labels` ([N, D], [N]), as transformers'
    causal-LM loss computes it: over the labelled rows, or summed and divided by the Trainer's
    `num_items_in_batch` (the labelled tokens of the whole accumulated batch, all ranks) when given.
    With no labelled row the loss is 0 and every gradient 0 (not 0/0)."""
    vocab = head.weight.shape[0]
    if num_items_in_batch is None:
        num_items_in_batch = (labels != IGNORE_INDEX).sum()
    divisor = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=hidden.device).clamp(min=1)
    return LinearCrossEntropy.apply(hidden, head.weight, head.bias, labels, max(1, CHUNK_ELEMENTS // vocab), divisor)
