"""The `--dry_run` memory plan: `train.py --dry_run` prints it and trains nothing; its parts are
exact where they can be (weights, gradients, AdamW states), its activations match what autograd
really keeps. The whole plan against the measured peak RSS of real training steps is a benchmark's
test (tests/bench/test_bench_memory.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import bitsandbytes as bnb
import pytest
import torch
from helpers import tiny_model_args
from PIL import Image
from test_freeze import RECIPES, fixed_batch

from cli import parse_config
from data.processor_prompt import encode_batch
from fixtures.recipes import FREEZE_RECIPES
from model.freeze import apply_freeze_policy
from model.memory_plan import format_plan, plan_memory, weight_bytes
from model.released import load_released_processor
from model.settings import ModelArguments
from run.checkpoint import load_base

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def built(tiny_base, **overrides):
    args = tiny_model_args(tiny_base, **overrides)
    torch.manual_seed(0)
    model = load_base(args)
    apply_freeze_policy(model, args)
    return model


# --- train.py --dry_run -------------------------------------------------------------------------


@pytest.mark.slow
def test_dry_run_prints_table_and_plan_and_trains_nothing(tiny_base, demo_data, tmp_path):
    out = str(tmp_path / "run")
    argv = [
        "configs/demo.yaml",
        "--vision_model", tiny_base["vision"],
        "--llm_model", tiny_base["llm"],
        "--data_path", demo_data["train"],
        "--image_folder", demo_data["image_folder"],
        "--per_device_train_batch_size", "3",
        "--max_length", "200",
        "--activation_checkpointing", "true",
        "--dry_run", "true",
        "--output_dir", out,
    ]
    result = subprocess.run(
        [sys.executable, "train.py", *argv],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["config.yaml", "freeze_table.txt", "memory_plan.txt"]  # no delta

    # What it printed is the freeze table, then the plan of this model for batch 3 x 200 tokens
    # with checkpointing on: the same text the function gives in this process.
    model_args, _, _ = parse_config(argv)
    model = load_base(model_args)
    apply_freeze_policy(model, model_args)
    expected = format_plan(plan_memory(model, 3, 200, gradient_checkpointing=True))
    with open(os.path.join(out, "freeze_table.txt")) as f:
        table = f.read()
    assert table + expected + "\n" in result.stdout
    assert "batch 3 x 200 tokens (64 image + 136 text)" in expected
    assert "gradient checkpointing on" in expected
    with open(os.path.join(out, "memory_plan.txt")) as f:
        assert f.read() == expected + "\n"


# --- the exact parts --------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["connector_only", "full_vit_llm", "lora_both", "qlora_nf4", "lora_8bit"])
def test_gradients_and_adamw_states_count_trainable_parameters_only(recipe, tiny_base):
    model = built(tiny_base, **RECIPES[recipe][0])
    plan = plan_memory(model, 2, 128, gradient_checkpointing=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert plan.gradients == 4 * trainable  # trainable tensors are fp32
    assert plan.optimizer == 2 * 4 * trainable
    assert plan.total == plan.weights_total + plan.gradients + plan.optimizer + plan.activations


def test_4bit_weights_count_half_a_byte_plus_quant_state(tiny_base):
    fp32 = plan_memory(built(tiny_base), 2, 128, False).weights
    nf4_model = built(tiny_base, bits=4)
    nf4 = plan_memory(nf4_model, 2, 128, False).weights
    logical = sum(m.in_features * m.out_features for m in nf4_model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert logical == 2 * (4 * 128 * 128 + 3 * 128 * 256)  # every decoder linear, two layers
    # Packed: half a byte each; double-quantized absmax: a byte per block of 64 values, an fp32
    # absmax per 256 of those; per layer, an fp32 offset and code books of 16 and 256 fp32 values.
    layers = sum(isinstance(m, bnb.nn.Linear4bit) for m in nf4_model.modules())
    quant_state = logical // 64 + 4 * logical // (64 * 256) + layers * 4 * (1 + 16 + 256)
    assert nf4["nf4 4-bit"] == logical // 2 + quant_state
    assert weight_bytes(nf4_model) == weight_bytes(nf4_model)  # no temporary copies counted
    # What left fp32 is exactly those weights.
    assert fp32["float32"] - nf4["float32"] == 4 * logical

    int8_model = built(tiny_base, bits=8)
    int8 = plan_memory(int8_model, 2, 128, False).weights
    rows = sum(m.out_features for m in int8_model.modules() if isinstance(m, bnb.nn.Linear8bitLt))
    assert int8["int8"] == logical + 4 * rows  # a byte each, an fp32 scale per row


@pytest.mark.parametrize("recipe", ["qlora_nf4", "qlora_fp4_single_quant", "qlora_both_nf4", "lora_8bit"])
def test_a_quantized_plan_without_weights_holds_what_loading_quantized_holds(recipe, tiny_base):
    """--dry_run plans QLoRA on the meta device (no weights to quantize): the quantizer lays the
    model out as loading would, and the plan counts what quantizing will store. Every figure of the
    plan equals the one of the model really loaded and quantized."""
    real = plan_memory(built(tiny_base, **RECIPES[recipe][0]), 2, 128, gradient_checkpointing=True)
    args = tiny_model_args(tiny_base, **RECIPES[recipe][0])
    meta = load_base(args, weights=False)
    apply_freeze_policy(meta, args)
    assert all(p.is_meta for n, p in meta.named_parameters() if "lora_" not in n)
    planned = plan_memory(meta, 2, 128, gradient_checkpointing=True)
    assert any("bit" in kind or kind == "int8" for kind in planned.weights), planned.weights
    assert planned.weights == real.weights
    assert (planned.gradients, planned.optimizer, planned.activations_ckpt) == (
        real.gradients, real.optimizer, real.activations_ckpt)


def test_image_tokens_must_fit_the_sequence(tiny_base):
    model = built(tiny_base)
    with pytest.raises(ValueError, match="max_length"):
        plan_memory(model, 2, model.num_image_tokens, gradient_checkpointing=False)


# --- activations against what autograd keeps --------------------------------------------------------


def saved_by_autograd(model, batch) -> int:
    """Bytes of every distinct tensor autograd saves for backward in one forward, parameters
    excluded. Without checkpointing this is all an activation costs until backward starts."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    return sum(seen.values())


@pytest.mark.parametrize(
    "recipe",
    [
        "connector_only", "full_llm", "full_vit_llm", "lora_llm", "lora_vit_only", "lora_both",
        "lora_freeze_qformer", "freeze_lora_stage", "resampler_lora", "regex_lora_layer1",
        "qlora_nf4", "lora_8bit",
    ],
)
def test_saved_activations_match_autograd(recipe, tiny_base):
    model = built(tiny_base, **RECIPES[recipe][0])
    for batch_size, text in ((4, 32), (1, 128)):
        batch = fixed_batch(model, batch_size=batch_size, text_tokens=text - 2)
        if batch_size > 1:  # padded, as the collator pads
            batch["attention_mask"][0, -3:] = 0
        seq_len = batch["input_ids"].shape[1]
        plan = plan_memory(model, batch_size, seq_len, gradient_checkpointing=False)
        measured = saved_by_autograd(model, batch)
        assert plan.saved_no_ckpt == pytest.approx(measured, rel=0.10), (batch_size, plan.saved_no_ckpt, measured)


def test_checkpointing_and_freezing_lower_the_plan(tiny_base):
    plans = {
        name: plan_memory(built(tiny_base, **RECIPES[name][0]), 8, 256, gradient_checkpointing=False)
        for name in ("connector_only", "full_llm", "full_vit_llm", "lora_llm")
    }
    for plan in plans.values():
        assert plan.activations_ckpt < plan.activations_no_ckpt
    # A frozen tower runs under no_grad: only its transient forward is counted, and it keeps
    # nothing; a training tower adds what its blocks keep.
    assert plans["full_llm"].frozen_tower_forward > 0 and plans["full_vit_llm"].frozen_tower_forward == 0
    assert plans["full_vit_llm"].activations_no_ckpt > plans["full_llm"].activations_no_ckpt
    assert plans["connector_only"].activations_no_ckpt < plans["lora_llm"].activations_no_ckpt
    # More image tokens, more activations: they are part of the sequence.
    model = built(tiny_base)
    short = plan_memory(model, 8, model.num_image_tokens + 16, False)
    long = plan_memory(model, 8, 2 * model.num_image_tokens + 16, False)
    assert long.activations_no_ckpt > short.activations_no_ckpt


@pytest.mark.slow
def test_dry_run_plans_a_7b_recipe_from_its_configs_alone(tmp_path):
    """configs/shapes/ holds only the config.json of CLIP ViT-L/14-336 and Vicuna-7B: no weights.
    The plan builds on the meta device, so it runs anywhere without downloading 14 GB."""
    result = subprocess.run(
        [sys.executable, "train.py", "configs/llava15_finetune.yaml", "--dry_run", "true",
         "--vision_model", "configs/shapes/clip-vit-large-patch14-336",
         "--llm_model", "configs/shapes/vicuna-7b-v1.5", "--output_dir", str(tmp_path), "--report_to", "none"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "llm        full         6,738,415,616" in result.stdout  # Llama-2-7B's published count
    assert "batch 16 x 2048 tokens (576 image + 1472 text)" in result.stdout  # 336 px / 14 = 24^2 patches
    adamw = next(line for line in result.stdout.splitlines() if line.startswith("AdamW states"))
    assert adamw.endswith(" 50.36 GiB")  # 8 bytes x 6.76 B trainable (LLM + projector)


# --- a released VLM: the same plan, read through model/anatomy.py --------------------------------

_LORA_SIZES = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0)
RELEASED_RECIPES = {  # fixtures/recipes.py's, by test_released.py's names
    "lora": {**FREEZE_RECIPES["lora_llm"], **_LORA_SIZES},
    "full": FREEZE_RECIPES["full_llm"],
    "vision_lora": {**FREEZE_RECIPES["lora_vit"], **_LORA_SIZES},
    "full_tower": FREEZE_RECIPES["full_vit"],
}


def released_plan_and_batch(released_vlm, family: str, recipe: str):
    """(model, batch, plan) for four one-image conversations, the image at the size the plan
    assumes (Qwen2.5-VL: --max_pixels; the others: the tower's image_size)."""
    budget = dict(min_pixels=64 * 64, max_pixels=64 * 64) if family == "qwen2_5_vl" else {}
    args = ModelArguments(vlm_model=released_vlm(family), **RELEASED_RECIPES[recipe], **budget)
    torch.manual_seed(0)
    model = load_base(args)
    apply_freeze_policy(model, args)
    side = 64 if budget else model.config.vision_config.image_size
    image = Image.new("RGB", (side, side), (120, 30, 200))
    turns = [{"role": "user", "content": "<image>\nWhat color is it? Describe it at length."},
             {"role": "assistant", "content": "purple, a deep and even purple " * 3}]
    batch = encode_batch(load_released_processor(args), [(turns, [image])] * 4, prefix_lm=model.prefix_lm)
    batch_size, seq_len = batch["input_ids"].shape
    supervised = int((batch["labels"][:, 1:] != -100).sum())  # logits only where a label is
    plan = plan_memory(model, batch_size, seq_len, False, supervised_tokens=supervised, padded=False)
    return model, batch, plan


@pytest.mark.parametrize("recipe", list(RELEASED_RECIPES))
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "smolvlm", "paligemma"])
def test_released_plan_matches_autograd(family, recipe, released_vlm):
    """The plan's image is the processor's (tokens per image counted in the batch), and what it
    says autograd keeps is what autograd keeps, tower and connector included when they train.
    Measured: within 1.5% for llava, smolvlm and paligemma, 6% for qwen2_5_vl's tower."""
    model, batch, plan = released_plan_and_batch(released_vlm, family, recipe)
    per_image = int((batch["input_ids"][0] == model.image_token_index).sum())
    assert plan.image_tokens == per_image
    measured = saved_by_autograd(model, batch)
    assert plan.saved_no_ckpt == pytest.approx(measured, rel=0.10), (plan.saved_no_ckpt, measured)


def test_released_plan_says_what_it_cannot_model(released_vlm):
    """MiniCPM-V 4.6's LLM (Qwen3.5) has gated-delta-net layers, which keep state the block model
    does not know: the plan says so, and its figure is a lower bound."""
    model, batch, plan = released_plan_and_batch(released_vlm, "minicpmv4_6", "lora")
    assert any("linear_attention layers (1 of 2)" in note and "lower bound" in note for note in plan.notes)
    assert "note: the LLM's linear_attention layers" in format_plan(plan)
    assert plan.saved_no_ckpt < saved_by_autograd(model, batch)


def test_released_plan_needs_a_pixel_budget_for_dynamic_resolution(released_vlm):
    args = ModelArguments(vlm_model=released_vlm("qwen2_5_vl"))
    model = load_base(args, weights=False)
    apply_freeze_policy(model, args)
    with pytest.raises(ValueError, match="--max_pixels"):
        plan_memory(model, 1, 512, gradient_checkpointing=True)
