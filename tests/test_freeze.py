"""The freeze audit: for every legal combination of the freeze / LoRA / quantization flags, build
the tiny model, apply the freeze policy, take real optimizer steps through VLMTrainer's optimizer
and check what actually happened to every tensor -- with gradient checkpointing off and on.

Each recipe states, independently of `model/freeze.py`, which parameter names must train and
which mode the table must print for each component; the test then proves it on the tensors.
"""

from __future__ import annotations

import re
import warnings

import bitsandbytes as bnb
import pytest
import torch
from helpers import tiny_model_args

from config import TrainArguments
from fixtures.recipes import FREEZE_RECIPES
from model.freeze import FreezeError, apply_freeze_policy
from model.vlm import IMAGE_TOKEN_INDEX
from run.checkpoint import load_base
from run.trainer import VLMTrainer

STEPS = 3  # LoRA B starts at zero, so A only gets a non-zero gradient from step 2 on


def _component(name: str) -> str:
    return name.split(".", 1)[0]


def _lora_in(component):
    return lambda n: _component(n) == component and "lora_" in n


def _whole(component):
    return lambda n: _component(n) == component


def _any(*predicates):
    return lambda n: any(p(n) for p in predicates)


_CONNECTOR = _whole("connector")

# name -> (which parameter names train, the table's mode per component); each recipe's flags are
# fixtures/recipes.py's, the one table the benchmarks read too.
EXPECTED = {
    "connector_only": (_CONNECTOR, ("frozen", "full", "frozen")),
    "full_llm": (_any(_CONNECTOR, _whole("llm")), ("frozen", "full", "full")),
    "full_vit": (_any(_CONNECTOR, _whole("vision")), ("full", "full", "frozen")),
    "full_vit_llm": (lambda n: True, ("full", "full", "full")),
    "lora_llm": (_any(_CONNECTOR, _lora_in("llm")), ("frozen", "full", "lora")),
    "lora_vit": (_any(_CONNECTOR, _lora_in("vision")), ("lora", "full", "frozen")),
    "lora_vit_only": (_lora_in("vision"), ("lora", "frozen", "frozen")),
    "lora_both": (_any(_CONNECTOR, _lora_in("vision"), _lora_in("llm")), ("lora", "full", "lora")),
    "lora_freeze_qformer": (_lora_in("llm"), ("frozen", "frozen", "lora")),
    "freeze_lora_stage": (_CONNECTOR, ("frozen", "full", "frozen")),
    "resampler_lora": (_any(_CONNECTOR, _lora_in("llm")), ("frozen", "full", "lora")),
    "resampler_lora_full_vit": (_any(_CONNECTOR, _whole("vision"), _lora_in("llm")), ("full", "full", "lora")),
    "regex_lora_layer1": (
        _any(_CONNECTOR, lambda n: _lora_in("llm")(n) and ".layers.1." in n),
        ("frozen", "full", "lora"),
    ),
    "regex_one_norm": (lambda n: n == "llm.model.layers.1.input_layernorm.weight", ("frozen", "frozen", "partial")),
    "qlora_nf4": (_any(_CONNECTOR, _lora_in("llm")), ("frozen", "full", "qlora")),
    "qlora_fp4_single_quant": (_any(_CONNECTOR, _lora_in("llm")), ("frozen", "full", "qlora")),
    "qlora_both_nf4": (_any(_CONNECTOR, _lora_in("vision"), _lora_in("llm")), ("qlora", "full", "qlora")),
    "lora_8bit": (_any(_CONNECTOR, _lora_in("llm")), ("frozen", "full", "qlora")),
    "connector_only_4bit": (_CONNECTOR, ("frozen", "full", "frozen")),
}
# name -> (ModelArguments overrides, which parameter names train, the table's mode per component)
RECIPES = {name: (FREEZE_RECIPES[name], *expected) for name, expected in EXPECTED.items()}


def test_every_recipe_of_the_table_is_audited():
    assert list(EXPECTED) == list(FREEZE_RECIPES)


def fixed_batch(model, batch_size=2, text_tokens=8, seed=0) -> dict:
    """[B, 2 + image tokens + text] ids with one image per row; loss on the text after the image."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.llm.get_input_embeddings().num_embeddings
    n_image = model.num_image_tokens
    input_ids = torch.randint(3, vocab, (batch_size, 2 + n_image + text_tokens), generator=generator)
    input_ids[:, 2 : 2 + n_image] = IMAGE_TOKEN_INDEX
    labels = input_ids.clone()
    labels[:, : 2 + n_image] = -100
    size = model.vision.image_size
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator),
    }


def make_trainer(model, tmp_path, **train_overrides) -> VLMTrainer:
    settings = {"learning_rate": 1e-3, **train_overrides}
    args = TrainArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **settings)
    return VLMTrainer(model=model, args=args)


def snapshot(model) -> dict[str, torch.Tensor]:
    """Every parameter's raw storage (a quantized weight's packed bytes), plus bitsandbytes' own
    quantization state (4-bit absmax; 8-bit row scales, which move from the weight to the
    module's state on the first forward): a frozen quantized weight must keep all of it."""
    state = {name: param.detach().clone() for name, param in model.named_parameters()}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state[f"{name}.weight#absmax"] = module.weight.quant_state.absmax.detach().clone()
        if isinstance(module, bnb.nn.Linear8bitLt):
            scb = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
            state[f"{name}.weight#SCB"] = scb.detach().clone()
    return state


def hand_count(model) -> dict[str, tuple[int, int]]:
    """(total, trainable) per component from named_parameters; a 4-bit weight counts as its
    module's in_features x out_features (its storage packs two values per byte)."""
    logical = {}
    for module_name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            logical[f"{module_name}.weight"] = module.in_features * module.out_features
    counts = {c: [0, 0] for c in ("vision", "connector", "llm")}
    for name, param in model.named_parameters():
        numel = logical.get(name, param.numel())
        counts[_component(name)][0] += numel
        if param.requires_grad:
            counts[_component(name)][1] += numel
    return {c: tuple(v) for c, v in counts.items()}


def train_steps(model, trainer, batch, steps=STEPS) -> list[float]:
    """The Trainer's own step, by hand: forward, backward, optimizer step, zero_grad. Returns the
    losses; asserts after every backward that each trainable parameter received a gradient."""
    optimizer = trainer.create_optimizer()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        missing = [n for n, p in trainable if p.grad is None]
        assert not missing, f"trainable parameters without a gradient: {missing[:5]}"
        optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses



@pytest.mark.parametrize("checkpointing", [False, True], ids=["no_ckpt", "ckpt"])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_freeze_audit(recipe, checkpointing, tiny_base, tmp_path):
    overrides, should_train, modes = RECIPES[recipe]
    args = tiny_model_args(tiny_base, **overrides)
    torch.manual_seed(0)
    model = load_base(args)
    rows = apply_freeze_policy(model, args)

    # What trains is what the recipe says, name by name.
    names = [n for n, _ in model.named_parameters()]
    expected = {n for n in names if should_train(n)}
    actual = {n for n, p in model.named_parameters() if p.requires_grad}
    assert actual == expected, (sorted(actual - expected)[:5], sorted(expected - actual)[:5])
    assert expected, "a legal recipe trains something"

    # The table: modes as the recipe states them, counts equal to a hand count.
    assert tuple(r.mode for r in rows) == modes
    counts = hand_count(model)
    for row in rows:
        assert (row.total, row.trainable) == counts[row.component], row
    # The connector trains under LoRA unless freeze_qformer says otherwise (PEFT never freezes it).
    connector_trains = all(p.requires_grad for n, p in model.named_parameters() if _component(n) == "connector")
    assert connector_trains == (not args.freeze_qformer)

    # A frozen tower keeps no autograd graph, even with the input-grad hook the peers attach for
    # checkpointing (ms-swift PR #10214: the hook kept a frozen tower's activations); a training
    # tower does keep one.
    model.vision.encoder.enable_input_require_grads()
    tower_out = []
    hook = model.vision.register_forward_hook(lambda module, inputs, output: tower_out.append(output))

    trainer = make_trainer(model, tmp_path)
    before = snapshot(model)
    batch = fixed_batch(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if checkpointing:
            model.activation_checkpointing_enable()
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.llm.modules())
        train_steps(model, trainer, batch)
    hook.remove()
    # "None of the inputs have requires_grad=True" (reentrant checkpointing on frozen inputs), and
    # torch's notice that it backpropagated through an op without an autograd kernel (silently
    # wrong gradients, e.g. bitsandbytes' inference-only 4-bit kernel).
    bad = [str(w.message) for w in caught if "requires_grad" in str(w.message) or "Autograd key" in str(w.message)]
    assert not bad, bad

    vision_trains = any(should_train(n) for n in names if _component(n) == "vision")
    if checkpointing and vision_trains:
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.vision.modules())
    assert tower_out
    for out in tower_out:
        assert out.requires_grad == vision_trains
        assert (out.grad_fn is not None) == vision_trains

    after = snapshot(model)
    params = dict(model.named_parameters())
    for key, old in before.items():
        name = key.split("#", 1)[0]
        if params[name].requires_grad:
            assert not torch.equal(after[key], old), f"{key} trains but did not change"
        else:
            assert torch.equal(after[key], old), f"{key} is frozen but changed"

    # The optimizer holds state for exactly the trainable tensors, each in one group.
    optimizer = trainer.optimizer
    trainable_ids = {id(p) for p in params.values() if p.requires_grad}
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(grouped) == len(set(grouped)) and set(grouped) == trainable_ids
    assert {id(p) for p in optimizer.state} == trainable_ids
    for state in optimizer.state.values():
        assert {"exp_avg", "exp_avg_sq"} <= set(state)


# --- QLoRA --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_really_quantizes_and_learns(bits, tiny_base, tmp_path):
    quant_cls = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    args = tiny_model_args(tiny_base, bits=bits, lora_enable=True)
    torch.manual_seed(0)
    model = load_base(args)
    apply_freeze_policy(model, args)

    decoder_linears = [
        (n, m)
        for n, m in model.llm.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in n and "lora_" not in n
        and not isinstance(getattr(m, "base_layer", None), torch.nn.Module)
    ]
    assert len(decoder_linears) == 2 * 7  # q k v o gate up down, two layers
    for name, module in decoder_linears:
        assert isinstance(module, quant_cls), f"{name} is {type(module).__name__}, not quantized"
    lm_head = model.llm.get_output_embeddings()
    assert type(lm_head) is torch.nn.Linear and lm_head.weight.dtype == torch.float32
    for name, module in model.connector.named_modules():
        assert not isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)), name
    assert all(p.dtype == torch.float32 for p in model.connector.parameters())
    # Norms stay fp32 (the peers' "expected Float, found BFloat16").
    norms = [p for n, p in model.llm.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.float32 for p in norms)
    # The tower has no LoRA here, so it is not quantized.
    assert not any(isinstance(m, quant_cls) for m in model.vision.modules())

    model.activation_checkpointing_enable()
    batch = fixed_batch(model, batch_size=4)
    model.eval()
    with torch.no_grad():
        loss_before = model(**batch).loss.item()
    train_steps(model, make_trainer(model, tmp_path, learning_rate=3e-3), batch, steps=6)
    model.eval()
    with torch.no_grad():
        loss_after = model(**batch).loss.item()
    assert loss_after < loss_before - 0.1, (loss_before, loss_after)


def test_an_eval_pass_leaves_4bit_training_intact(tiny_base):
    """bitsandbytes repacks a 4-bit weight for inference on its first eval-mode, no-grad forward
    on a CPU with AVX512-BF16; the repacked layer has no backward, so later training silently
    loses the gradient through every frozen 4-bit weight. An evaluation between training steps
    (or before them) must change nothing: same bytes, same gradients."""

    def connector_grad(evaluate_first: bool):
        torch.manual_seed(0)
        args = tiny_model_args(tiny_base, bits=4, lora_enable=True, lora_dropout=0.0)
        model = load_base(args)
        apply_freeze_policy(model, args)
        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
        before = snapshot(model)
        batch = fixed_batch(model)
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(**batch)
        after = snapshot(model)
        assert all(torch.equal(after[k], v) for k, v in before.items())
        model.train()
        model(**batch).loss.backward()
        return model.connector.linear_1.weight.grad

    assert torch.equal(connector_grad(False), connector_grad(True))


def test_per_component_learning_rates_reach_the_optimizer(tiny_base, tmp_path):
    """LLaVA's LoRA recipe: 2e-4 for LoRA, 2e-5 for the projector; a third rate for the tower."""
    args = tiny_model_args(tiny_base, bits=4, lora_enable=True, lora_target="both")
    model = load_base(args)
    apply_freeze_policy(model, args)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.vision.modules())  # QLoRA on the ViT
    trainer = make_trainer(model, tmp_path, learning_rate=2e-4, connector_lr=2e-5, vision_lr=1e-5)
    optimizer = trainer.create_optimizer()
    component_of = {id(p): _component(n) for n, p in model.named_parameters()}
    rates = {"vision": 1e-5, "connector": 2e-5, "llm": 2e-4}
    seen = set()
    for group in optimizer.param_groups:
        components = {component_of[id(p)] for p in group["params"]}
        assert len(components) == 1, components
        (component,) = components
        assert group["lr"] == rates[component]
        seen.add(component)
    assert seen == {"vision", "connector", "llm"}


def test_rates_default_to_learning_rate(tiny_base, tmp_path):
    args = tiny_model_args(tiny_base, lora_enable=True, lora_target="both")
    model = load_base(args)
    apply_freeze_policy(model, args)
    optimizer = make_trainer(model, tmp_path, learning_rate=3e-4).create_optimizer()
    assert {g["lr"] for g in optimizer.param_groups} == {3e-4}


def test_a_frozen_regex_that_empties_a_declared_component_is_refused(tiny_base):
    """`--lora_enable true` declares the LLM's LoRA trainable; a frozen_regex that matches every
    adapter would train the connector alone without a word. Refused, naming the regex."""
    args = tiny_model_args(tiny_base, lora_enable=True, lora_r=4, frozen_regex=[r"llm\..*lora_"])
    with pytest.raises(FreezeError, match=r"llm \(lora\).*--frozen_regex \['llm\\\\\.\.\*lora_'\]"):
        apply_freeze_policy(load_base(args), args)


@pytest.mark.parametrize("fraction, trained_layers", [(0.5, {1}), (1.0, {0, 1})])
def test_lora_top_layers_is_chosen_from_the_models_depth(tiny_base, fraction, trained_layers):
    """openpi's recipe, LoRA on the upper half of the LLM, on a 2-layer LLM: layer 1 trains (a
    fixed layer regex written for a 26-layer model froze every adapter of a small one)."""
    args = tiny_model_args(tiny_base, lora_enable=True, lora_r=4, lora_top_layers=fraction)
    model = load_base(args)
    apply_freeze_policy(model, args)
    layers = {
        int(re.search(r"layers\.(\d+)\.", n).group(1)): p.requires_grad
        for n, p in model.llm.named_parameters() if "lora_" in n
    }
    assert {layer for layer, trains in layers.items() if trains} == trained_layers and len(layers) == 2
