"""model/loss.py: the LM head fused with the cross-entropy, chunk by chunk, gives transformers'
causal-LM loss and its gradients; the model takes that path only where the LLM's logits are its
plain head's output, and keeps the LLM's own head and loss where a family changes its logits."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model_args
from torch import nn
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.loss.loss_utils import ForCausalLMLoss

import model.loss
from fixtures.tensor_peak import TensorPeak
from model.freeze import apply_freeze_policy
from model.loss import linear_cross_entropy
from model.vlm import IMAGE_TOKEN_INDEX
from run.checkpoint import load_base

VOCAB, DIM, ROWS = 50, 16, 30


def head_and_batch(bias: bool, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    head = nn.Linear(DIM, VOCAB, bias=bias).to(dtype)
    hidden = torch.randn(ROWS, DIM, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, VOCAB, (ROWS,))
    labels[::4] = -100  # unlabelled rows: image tokens, prompt, padding
    return head, hidden, labels


def reference(hidden, head, labels, num_items):
    """What the model's unfused path computes: the head, then transformers' causal-LM loss."""
    return ForCausalLMLoss(head(hidden), None, head.out_features, num_items_in_batch=num_items, shift_labels=labels)


def loss_and_grads(loss_fn, head, hidden, labels, num_items, scale: float):
    head.zero_grad()
    hidden.grad = None
    loss = loss_fn(hidden, head, labels, num_items)
    (scale * loss).backward()  # scale: the Trainer's accumulation divisor or fp16 loss scale
    grads = {"hidden": hidden.grad.clone(), **{n: p.grad.clone() for n, p in head.named_parameters()}}
    return loss.detach(), grads


@pytest.mark.parametrize("chunk_elements", [2**25, 7 * VOCAB])  # one chunk; chunks of 7 rows, the last short
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("num_items", [None, 37])
def test_loss_and_gradients_equal_head_then_cross_entropy(monkeypatch, chunk_elements, bias, num_items):
    monkeypatch.setattr(model.loss, "CHUNK_ELEMENTS", chunk_elements)
    head, hidden, labels = head_and_batch(bias)
    items = None if num_items is None else torch.tensor(num_items)
    expected_loss, expected = loss_and_grads(reference, head, hidden, labels, items, scale=3.0)
    loss, grads = loss_and_grads(linear_cross_entropy, head, hidden, labels, items, scale=3.0)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert grads["hidden"][::4].abs().max() == 0  # an unlabelled row gets no gradient


@pytest.mark.parametrize("precision", ["bf16 weights", "fp32 weights under bf16 autocast"])
def test_bf16_matches_the_unfused_bf16_path(monkeypatch, precision):
    """A 16-bit head: logits in bf16, the loss upcast to fp32, gradients back in bf16, as the
    LLM's own head and loss do it, whether the weights are bf16 or fp32 under autocast (the
    Trainer's `--bf16` keeps trainable weights in fp32); only the chunking's rounding differs."""
    monkeypatch.setattr(model.loss, "CHUNK_ELEMENTS", 7 * VOCAB)
    autocast = precision.endswith("autocast")
    head, hidden, labels = head_and_batch(bias=False, dtype=torch.float32 if autocast else torch.bfloat16)
    results = {}
    for loss_fn in (reference, linear_cross_entropy):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            results[loss_fn] = loss_and_grads(loss_fn, head, hidden, labels, None, scale=1.0)
    (expected_loss, expected), (loss, grads) = results[reference], results[linear_cross_entropy]
    assert loss.dtype == torch.float32 and grads["weight"].dtype == head.weight.dtype
    torch.testing.assert_close(loss, expected_loss, rtol=1e-3, atol=1e-3)
    for name, grad in expected.items():
        assert grads[name].dtype == grad.dtype, name
        torch.testing.assert_close(grads[name].float(), grad.float(), rtol=2e-2, atol=1e-3, msg=name)


def test_pure_bf16_gradients_are_divided_by_the_labelled_count_in_fp32_before_the_cast():
    """Pure bf16: the gradient of the logits is divided by the labelled count in fp32, before its
    cast to bf16, not the bf16 gradients after the head's matmuls (a second rounding). Against a
    float64 reference, the relative error of either gradient is about 1.9e-3 (20 seeds: at most
    1.97e-3); divided after the cast, the hidden states' was 2.9-3.1e-3 and the weight's 2.7e-3."""
    torch.manual_seed(0)
    rows, dim, vocab = 400, 64, 512  # 300 labelled rows: 1 / 300 is no power of two
    head = nn.Linear(dim, vocab, bias=False).to(torch.bfloat16)
    hidden = torch.randn(rows, dim, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (rows,))
    labels[::4] = -100
    linear_cross_entropy(hidden, head, labels).backward()
    hidden64 = hidden.detach().double().requires_grad_()
    weight64 = head.weight.detach().double().requires_grad_()
    nn.functional.cross_entropy(hidden64 @ weight64.T, labels).backward()  # the mean over labelled rows
    for name, grad, exact in (("hidden", hidden.grad, hidden64.grad), ("weight", head.weight.grad, weight64.grad)):
        assert grad.dtype == torch.bfloat16, name
        error = float((grad.double() - exact).norm() / exact.norm())
        assert error < 2.4e-3, (name, error)


def test_a_frozen_head_gets_no_gradient_and_the_hidden_states_do():
    head, hidden, labels = head_and_batch(bias=True)
    head.requires_grad_(False)
    linear_cross_entropy(hidden, head, labels).backward()
    assert head.weight.grad is None and head.bias.grad is None
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


@pytest.mark.parametrize("num_items", [None, 0])
def test_no_labelled_row_gives_zero_loss_and_zero_gradients(num_items):
    head, hidden, labels = head_and_batch(bias=True)
    labels[:] = -100
    items = None if num_items is None else torch.tensor(num_items)
    loss = linear_cross_entropy(hidden, head, labels, items)
    loss.backward()
    assert loss.item() == 0.0
    for grad in (hidden.grad, head.weight.grad, head.bias.grad):  # present (every rank syncs), and 0
        assert grad is not None and grad.abs().max() == 0


# --- which path the model takes ------------------------------------------------------------------


def tiny_llm(tmp_path, family: str, softcap: float = 1.0) -> str:
    """A seeded tiny causal LM: Qwen2 with its head tied to the input embeddings, or a family that
    changes its logits after the head."""
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    if family == "qwen2":
        llm = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
    elif family == "gemma2":  # tanh soft-capping of the logits
        llm = Gemma2ForCausalLM(Gemma2Config(**common, head_dim=16, final_logit_softcapping=softcap))
    else:  # cohere: logits * logit_scale
        llm = CohereForCausalLM(CohereConfig(**common, logit_scale=0.0625))
    path = str(tmp_path / family)
    llm.save_pretrained(path)
    return path


def training_batch(model, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, 300, (2, model.num_image_tokens + 12), generator=generator)
    input_ids[:, 1 : 1 + model.num_image_tokens] = IMAGE_TOKEN_INDEX
    labels = input_ids.masked_fill(input_ids == IMAGE_TOKEN_INDEX, -100)
    labels[:, 0] = -100
    pixel_values = torch.randn(2, 3, 48, 48, generator=generator)
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixel_values, labels=labels)


def built(tiny_base, **overrides):
    args = tiny_model_args(tiny_base, **overrides)
    torch.manual_seed(0)
    vlm = load_base(args)
    apply_freeze_policy(vlm, args)
    return vlm.train()


@pytest.mark.parametrize(("family", "softcap"), [("gemma2", 1.0), ("gemma2", 30.0), ("cohere", None)])
def test_a_family_that_changes_its_logits_keeps_its_own_head_and_loss(tiny_base, tmp_path, family, softcap):
    vlm = built({**tiny_base, "llm": tiny_llm(tmp_path, family, softcap)}, freeze_llm=False)
    batch = training_batch(vlm)
    out = vlm(**batch)
    assert vlm.fused_loss is False and out.logits is not None  # found out on the first step
    with torch.no_grad():  # the LLM's own forward and loss, every position
        embeds = vlm.embed_inputs(batch["input_ids"], batch["pixel_values"])
        expected = vlm.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-5, atol=1e-6)
    # What the fused path would have given: the plain head's loss, off by the family's change.
    # (Gemma's real cap of 30 barely bends a tiny model's small logits; the check is exact, so
    # it is found out all the same.)
    vlm.fused_loss = True
    if softcap != 30.0:
        assert not torch.allclose(vlm(**batch).loss.detach(), expected, rtol=1e-5, atol=1e-6)


def test_a_plain_head_is_fused_and_a_lora_wrapped_head_is_not(tiny_base):
    vlm = built(tiny_base, lora_enable=True)  # LoRA on the LLM's linear layers, not its head
    out = vlm(**training_batch(vlm))
    assert vlm.fused_loss is True and out.logits is None and out.loss.requires_grad
    vlm = built(tiny_base, lora_enable=True, lora_modules=["q_proj", "v_proj", "lm_head"])
    out = vlm(**training_batch(vlm))
    assert vlm.fused_loss is False and out.logits is not None


def test_a_tied_head_gets_the_gradients_of_both_its_uses(tiny_base, tmp_path):
    """Qwen2.5-0.5B's head is its input embedding table: the fused loss's weight gradient and the
    embedding lookup's add up in one tensor, as through the LLM's own head and loss."""
    vlm = built({**tiny_base, "llm": tiny_llm(tmp_path, "qwen2")}, freeze_llm=False)
    table = vlm.llm.get_input_embeddings().weight
    assert vlm.llm.get_output_embeddings().weight is table
    batch = training_batch(vlm)
    grads = {}
    for fused in (False, True):
        vlm.fused_loss, vlm.head_at_labels_only = fused, fused  # False: the head at every position
        vlm.zero_grad()
        out = vlm(**batch)
        out.loss.backward()
        assert (out.logits is None) == fused
        grads[fused] = {n: p.grad.clone() for n, p in vlm.named_parameters() if p.requires_grad}
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_holds_one_chunk_of_logits_at_a_time(monkeypatch):
    """The point of the fusion: forward and backward allocate one chunk's [C, V] logits at a time,
    where the head-then-loss path holds several [N, V] tensors. Counted by the profiler's
    allocation trace (fixtures/tensor_peak.py), not sampled."""

    rows, vocab, chunk_rows = 64, 50_000, 16
    monkeypatch.setattr(model.loss, "CHUNK_ELEMENTS", chunk_rows * vocab)
    torch.manual_seed(0)
    head = nn.Linear(8, vocab, bias=False)
    hidden = torch.randn(rows, 8, requires_grad=True)
    labels = torch.randint(0, vocab, (rows,))
    chunk_bytes = chunk_rows * vocab * 4

    def peak(loss_fn) -> int:
        return TensorPeak(torch.device("cpu")).of(lambda: loss_fn().backward())

    fused = peak(lambda: linear_cross_entropy(hidden, head, labels))
    unfused = peak(lambda: reference(hidden, head, labels, None))
    # The weight's fp32 gradient (vocab x 8) is allocated either way; the logits are what differ.
    weight_grad = head.weight.numel() * 4
    assert fused - weight_grad < 1.2 * chunk_bytes, (fused, chunk_bytes)
    assert unfused - weight_grad > 2 * rows * vocab * 4, (unfused, chunk_bytes)
