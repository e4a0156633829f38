"""Released VLMs as bases (`--vlm_model DIR`), on the tiny seeded models of every family in
fixtures/tiny_vlms.py (llava, qwen2_5_vl, smolvlm, paligemma, minicpmv4_6; nothing downloaded): the
freeze table per recipe, our training loss against the model's own `forward(labels=...)`, the
labels the processor path makes, train.py -> delta checkpoint -> infer.py end to end with frozen
tensors bit-identical to the base, the adapter as plain PEFT reads it, a delta refused on a base
of the same config with other weights, a 4-bit QLoRA step, activation checkpointing with a frozen
tower and with vision LoRA, and the image path touched by a text-only batch (DDP's no-hang rule).

train.py and infer.py run in-process (`train.main`, `infer.main`: the scripts' own code) for every
family; one family also runs them as real subprocesses. The 2-rank runs (DDP, ZeRO-3) are in
tests/test_released_distributed.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import bitsandbytes as bnb
import pytest
import torch
from helpers import REPO_ROOT, SUBPROCESS_ENV, part_of
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForImageTextToText

import infer
import train
from cli import is_user_error
from config import ModelArguments
from data.media import load_image
from data.processor_prompt import encode_batch
from fixtures.recipes import FREEZE_RECIPES
from fixtures.tiny_vlms import FAMILIES
from model.components import COMPONENTS
from model.freeze import apply_freeze_policy, format_table, is_lora, is_quantized, logical_numel
from model.released import load_released_processor
from run.checkpoint import DELTA, MANIFEST, CheckpointError, load_base, load_checkpoint, save_checkpoint
from run.fingerprint import base_name
from run.predict import generate_answers

LORA = dict(lora_enable=True, lora_r=4, lora_alpha=8, lora_dropout=0.0)
# recipe -> (ModelArguments overrides: fixtures/recipes.py's flags, LoRA's small sizes; the mode the
# freeze table must print per component)
RECIPES = {
    "lora": ({**FREEZE_RECIPES["lora_llm"], **LORA}, {"vision": "frozen", "connector": "full", "llm": "lora"}),
    "full": (FREEZE_RECIPES["full_llm"], {"vision": "frozen", "connector": "full", "llm": "full"}),
    "connector_only": (FREEZE_RECIPES["connector_only"], {"vision": "frozen", "connector": "full", "llm": "frozen"}),
    "vision_lora": ({**FREEZE_RECIPES["lora_vit"], **LORA}, {"vision": "lora", "connector": "full", "llm": "frozen"}),
    "full_tower": (FREEZE_RECIPES["full_vit"], {"vision": "full", "connector": "full", "llm": "frozen"}),
}
# What one supervised assistant turn decodes to: its answer and the template's end of turn, nothing
# of the prompt (the tiny chat templates of fixtures/tiny_vlms.py).
CHATML_END = "{}<|im_end|>\n"
SUPERVISED = {
    "llava": " {}</s>", "llava_next": " {}</s>", "llava_onevision": CHATML_END, "mistral3": "{}</s>",
    "qwen2_5_vl": CHATML_END, "qwen3_vl": CHATML_END, "qwen3_5": CHATML_END,
    "glm4v": "{}<|user|>",  # the template writes no end: the next turn's marker is supervised
    "paligemma": "\n{}<eos>", "gemma3": "{}<end_of_turn>\n", "gemma4": "{}<end_of_turn>\n",
    "smolvlm": " {}<end_of_utterance>\n", "idefics3": " {}<end_of_utterance>\n",
    "lfm2_vl": CHATML_END, "internvl": CHATML_END, "minicpmv4_6": CHATML_END, "minicpmv4_7": CHATML_END,
}
ANSWERS = [["red", "circle"], ["2"]]  # per conversation of `conversations`
QUESTION = "What color are the shapes?"
MAX_NEW_TOKENS = 8


def build(folder: str, **overrides):
    """(model, args, freeze rows): the one loader's base, frozen by the one policy."""
    args = ModelArguments(vlm_model=folder, **overrides)
    model = load_base(args)
    rows = apply_freeze_policy(model, args)
    return model, args, rows


@pytest.fixture(scope="module")
def images(released_data) -> list:
    folder = released_data["image_folder"]
    return [load_image(os.path.join(folder, "images", f"train-0000{i}.png")) for i in range(2)]


def conversations(images) -> list[tuple[list[dict], list]]:
    """A two-turn conversation and a one-turn one (of another length: the batch is padded)."""
    return [
        ([{"role": "user", "content": "<image>\n" + QUESTION}, {"role": "assistant", "content": "red"},
          {"role": "user", "content": "What shape is shown?"}, {"role": "assistant", "content": "circle"}],
         [images[0]]),
        ([{"role": "user", "content": "<image>\nHow many shapes are there?"}, {"role": "assistant", "content": "2"}],
         [images[1]]),
    ]


TEXT_ONLY = [
    ([{"role": "user", "content": "What is a square?"}, {"role": "assistant", "content": "square"}], []),
    ([{"role": "user", "content": "What is red?"}, {"role": "assistant", "content": "red"}], []),
]


def model_batch(model, args, convs) -> dict:
    return encode_batch(load_released_processor(args), convs, prefix_lm=model.prefix_lm)


@torch.no_grad()
def logits(model, batch: dict) -> torch.Tensor:
    model.eval()
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()


def perturb_lora(model, seed: int = 0) -> None:
    """LoRA B starts at zero, which leaves the adapters out of every output: give them values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)


# --- 1. the freeze table ---------------------------------------------------------------------


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_freeze_table_per_recipe(family, recipe, released_vlm):
    overrides, modes = RECIPES[recipe]
    model, _, rows = build(released_vlm(family), **overrides)
    assert {r.component: r.mode for r in rows} == modes, format_table(rows)

    params = list(model.named_parameters())
    # Every parameter is in a component, the one its transformers name says.
    wrong = [(n, model.component(n), part_of(family, n)) for n, _ in params if model.component(n) != part_of(family, n)]
    assert not wrong, wrong[:5]
    # The three rows count every parameter once, and exactly the trainable ones as trainable.
    assert [r.component for r in rows] == list(COMPONENTS)
    assert sum(r.total for r in rows) == sum(logical_numel(p) for _, p in params)
    assert sum(r.trainable for r in rows) == sum(p.numel() for _, p in params if p.requires_grad) > 0
    # LoRA sits only in the component the recipe names, never on the connector or the LM head.
    lora = [n for n, _ in params if is_lora(n)]
    if overrides.get("lora_enable"):
        target = "vision" if overrides.get("lora_target") == "vit" else "llm"
        assert lora and {model.component(n) for n in lora} == {target}
        assert not any("lm_head" in n for n in lora)
    else:
        assert not lora


# --- 2. the loss, and the labels it reads ------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_are_the_answers_and_never_an_image(family, released_vlm, images):
    args = ModelArguments(vlm_model=released_vlm(family), **LORA)
    processor = load_released_processor(args)
    batch = encode_batch(processor, conversations(images), prefix_lm=family == "paligemma")
    ids, labels = batch["input_ids"], batch["labels"]
    config = AutoConfig.from_pretrained(args.vlm_model)
    image_token = config.image_token_id
    labelled = labels != -100

    per_row = (ids == image_token).sum(dim=1).tolist()
    assert per_row[0] == per_row[1] > 0  # one 48x48 image each
    assert not (labelled & (ids == image_token)).any(), "a label on an image token"
    assert not (labelled & (batch["attention_mask"] == 0)).any(), "a label on padding"
    assert torch.equal(labels[labelled], ids[labelled])
    for row, answers in enumerate(ANSWERS):
        positions = labelled[row].nonzero().flatten().tolist()
        runs, start = [], 0  # contiguous labelled runs: one per assistant turn
        for k in range(1, len(positions) + 1):
            if k == len(positions) or positions[k] != positions[k - 1] + 1:
                runs.append(positions[start:k])
                start = k
        decoded = [processor.tokenizer.decode(ids[row, run]) for run in runs]
        assert decoded == [SUPERVISED[family].format(a) for a in answers]
    if family == "paligemma":
        # Prefix-LM: image + question attend bidirectionally (0), the answers causally (1).
        first = labelled.int().argmax(dim=1)
        for row in range(2):
            types = batch["token_type_ids"][row, : int(batch["attention_mask"][row].sum())]
            assert not types[: first[row]].any() and types[first[row]:].all()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "own_head"])
@pytest.mark.parametrize("family", FAMILIES)
def test_training_loss_equals_the_models_own(family, fused, released_vlm, images):
    """In a training step (train mode, gradients on) our loss, at labelled positions only, equals
    the transformers model's own `forward(..., labels=...)` loss on the same batch."""
    model, args, _ = build(released_vlm(family), **LORA, fused_loss=fused)
    perturb_lora(model)
    batch = model_batch(model, args, conversations(images))
    model.train()
    ours = model(**batch).loss
    theirs = model.vlm(**batch).loss
    assert ours.requires_grad
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    if not fused:
        assert model.fused_loss is False

    # The Trainer's num_items_in_batch (the batch's labelled tokens over every rank) divides the sum.
    count = int((batch["labels"][:, 1:] != -100).sum())
    for items, scale in ((count, 1.0), (2 * count, 0.5)):
        loss = model(**batch, num_items_in_batch=torch.tensor(items)).loss
        torch.testing.assert_close(loss, theirs * scale, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_loss_is_used_where_the_logits_are_the_plain_head(family, released_vlm, images):
    """The five tiny families' logits are their `nn.Linear` head on the last hidden states, bit
    for bit (checked here first), so a training step must take the fused path: the memory saving
    must not be lost to a probe that compares two different matmuls."""
    model, args, _ = build(released_vlm(family), freeze_llm=False)
    batch = model_batch(model, args, conversations(images))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        hidden = model.base.model(**inputs).last_hidden_state
        assert torch.equal(model.output_head()(hidden), model.vlm(**inputs).logits), "precondition"
    model.train()
    model(**batch).loss.backward()
    assert model.fused_loss is True, f"{family}: the first-step probe turned the fused loss off"


# --- 3-5. train.py -> checkpoint -> infer.py; PEFT; the wrong base ----------------------------


def train_argv(folder: str, data: dict, out: str, cache: str, *extra: str) -> list[str]:
    return [
        "--vlm_model", folder, "--data_path", data["train"], "--image_folder", data["image_folder"],
        "--output_dir", out, "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--report_to", "none", "--save_steps", "2", "--disable_tqdm", "true", "--warmup_steps", "0",
        "--learning_rate", "1e-3", "--data_check_cache", cache, *extra,
    ]


RECIPE_FLAGS = {
    "lora": ["--lora_enable", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0"],
    "full": ["--freeze_llm", "false"],
}


@pytest.fixture(scope="module")
def train_run(released_vlm, released_data, tmp_path_factory):
    """`train_run(family, recipe)` -> {"out", "model"}: train.py's main, in this process, two steps
    of batch 2; "model" is the very model its Trainer trained. Each (family, recipe) runs once."""
    runs: dict[tuple[str, str], dict] = {}

    def run(family: str, recipe: str) -> dict:
        if (family, recipe) not in runs:
            root = tmp_path_factory.mktemp(f"train-{family}-{recipe}")
            out = str(root / "out")
            trainers = []

            class Recording(train.VLMTrainer):
                def __init__(self, *args, **kwargs):
                    super().__init__(*args, **kwargs)
                    trainers.append(self)

            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(train, "VLMTrainer", Recording)
                train.main(train_argv(released_vlm(family), released_data, out, str(root / "cache"),
                                      *RECIPE_FLAGS[recipe]))
            (trainer,) = trainers
            runs[family, recipe] = {"out": out, "model": trainer.model.eval()}
        return runs[family, recipe]

    return run


def ask(images) -> list[tuple[list[dict], list]]:
    return [([{"role": "user", "content": "<image>\n" + QUESTION}], [images[0]])]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["lora", "full"])
@pytest.mark.parametrize("family", FAMILIES)
def test_train_py_keeps_frozen_weights_and_infer_py_answers(family, recipe, train_run, released_vlm,
                                                           released_data, images, capsys):
    folder = released_vlm(family)
    run = train_run(family, recipe)
    out, model = run["out"], run["model"]

    # Frozen tensors are bit-identical to the base as saved (both read by transformers' own names:
    # save_pretrained writes other key names for some families); what trains has moved.
    base = dict(AutoModelForImageTextToText.from_pretrained(folder).named_parameters())
    trained = {base_name(n): p for n, p in model.base.named_parameters() if not is_lora(n)}
    assert trained.keys() == base.keys()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and not is_lora(n)}
    trainable_plain = {base_name(n.removeprefix("vlm.")) for n in trainable}
    changed_frozen = [n for n in trained if n not in trainable_plain and not torch.equal(trained[n], base[n])]
    assert not changed_frozen, changed_frozen[:5]
    moved = {part_of(family, n) for n in trainable_plain if not torch.equal(trained[n], base[n])}
    assert moved == ({"connector"} if recipe == "lora" else {"connector", "llm"})
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert bool(lora_b) == (recipe == "lora") and all(p.abs().sum() > 0 for p in lora_b)

    # The checkpoint: manifest, the delta of exactly what trained, the adapter folder under LoRA.
    for name in (MANIFEST, DELTA, "freeze_table.txt", "checkpoint-2/" + MANIFEST):
        assert os.path.isfile(os.path.join(out, name)), name
    assert os.path.isfile(os.path.join(out, "adapter", "adapter_model.safetensors")) == (recipe == "lora")
    with open(os.path.join(out, MANIFEST)) as f:
        manifest = json.load(f)
    assert manifest["adapters"] == (["adapter"] if recipe == "lora" else [])
    assert manifest["base"]["vlm"] == folder
    delta = load_file(os.path.join(out, DELTA))
    assert set(delta) == trainable == set(manifest["tensors"])
    params = dict(model.named_parameters())
    assert all(torch.equal(tensor, params[name]) for name, tensor in delta.items())
    with open(os.path.join(out, "freeze_table.txt")) as f:
        printed = [line.split()[:2] for line in f.read().splitlines()[1:4]]
    assert printed == [[c, m] for c, m in RECIPES[recipe][1].items()]

    # The one loader rebuilds the trained model; infer.py prints what it generates.
    loaded, inputs, _ = load_checkpoint(out)
    batch = model_batch(loaded, loaded.build_args, conversations(images))
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=1e-5, rtol=0)
    # Token for token, without stopping at an end of turn (a random tiny model may answer "" at once).
    prompt = inputs.prompt_batch(ask(images))
    greedy = dict(max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                  pad_token_id=inputs.text_tokenizer.pad_token_id)
    assert torch.equal(loaded.generate(**prompt, **greedy), model.generate(**prompt, **greedy))
    (answer,) = generate_answers(loaded, inputs, ask(images), max_new_tokens=MAX_NEW_TOKENS)
    image = os.path.join(released_data["image_folder"], "images", "train-00000.png")
    capsys.readouterr()
    infer.main(["--checkpoint", out, "--image", image, "--prompt", QUESTION, "--max_new_tokens", str(MAX_NEW_TOKENS)])
    assert capsys.readouterr().out.endswith(answer + "\n")


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_and_delta_load_with_plain_peft(family, train_run, released_vlm, images):
    """adapter/ is PEFT's own folder for the transformers model, and the delta's names are that
    model's (under `vlm.`): plain PEFT + the delta give our loaded model's logits."""
    run = train_run(family, "lora")
    peft_model = PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(released_vlm(family)), os.path.join(run["out"], "adapter")
    )
    delta = load_file(os.path.join(run["out"], DELTA))
    result = peft_model.load_state_dict({k.removeprefix("vlm."): v for k, v in delta.items()}, strict=False)
    assert not result.unexpected_keys
    loaded, *_ = load_checkpoint(run["out"])
    batch = model_batch(loaded, loaded.build_args, conversations(images))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    peft_model.eval()
    with torch.no_grad():
        theirs = peft_model(**inputs).logits
        with peft_model.disable_adapter():
            without_lora = peft_model(**inputs).logits
    torch.testing.assert_close(theirs, logits(loaded, batch), atol=1e-5, rtol=0)
    assert (without_lora - theirs).abs().max() > 1e-4, "the adapter changed nothing: the check proves nothing"


def copy_checkpoint(src: str, dst: str) -> str:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoint-*"))
    return dst


@pytest.mark.parametrize("family", FAMILIES)
def test_delta_is_refused_on_the_same_config_with_other_weights(family, train_run, released_vlm, tmp_path):
    other = released_vlm(family, seed=1)
    with open(os.path.join(released_vlm(family), "config.json")) as a, open(os.path.join(other, "config.json")) as b:
        assert json.load(a) == json.load(b)  # the same model, but for its weights
    ckpt = copy_checkpoint(train_run(family, "lora")["out"], str(tmp_path / "ckpt"))
    with open(os.path.join(ckpt, MANIFEST)) as f:
        manifest = json.load(f)
    manifest["base"]["vlm"] = manifest["model_args"]["vlm_model"] = other
    with open(os.path.join(ckpt, MANIFEST), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_checkpoint(ckpt)


def test_init_from_refuses_a_parent_trained_on_other_weights(train_run, released_vlm, released_data, tmp_path):
    parent = train_run("llava", "lora")["out"]
    out = str(tmp_path / "stage2")
    argv = train_argv(released_vlm("llava", seed=1), released_data, out, str(tmp_path / "cache"),
                      *RECIPE_FLAGS["lora"], "--init_from", parent)
    with pytest.raises(CheckpointError, match="fingerprint"):
        train.main(argv)
    assert not os.path.exists(os.path.join(out, DELTA))


@pytest.mark.slow
def test_the_real_scripts_as_subprocesses(released_vlm, released_data, tmp_path):
    """`python train.py --vlm_model DIR` (LoRA) then `python infer.py --checkpoint OUT`, as a user runs them."""
    folder, out = released_vlm("qwen2_5_vl"), str(tmp_path / "out")

    def script(*argv):
        result = subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=600, env=SUBPROCESS_ENV)
        assert result.returncode == 0, f"{argv[0]} exited {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        return result.stdout

    script("train.py", *train_argv(folder, released_data, out, str(tmp_path / "cache"), *RECIPE_FLAGS["lora"]))
    with open(os.path.join(out, "freeze_table.txt")) as f:
        assert [line.split()[:2] for line in f.read().splitlines()[1:4]] == [
            ["vision", "frozen"], ["connector", "full"], ["llm", "lora"]]
    image = os.path.join(released_data["image_folder"], "images", "train-00000.png")
    printed = script("infer.py", "--checkpoint", out, "--image", image, "--prompt", QUESTION,
                     "--max_new_tokens", str(MAX_NEW_TOKENS))
    loaded, inputs, _ = load_checkpoint(out)
    (expected,) = generate_answers(loaded, inputs, ask([load_image(image)]), max_new_tokens=MAX_NEW_TOKENS)
    assert printed.endswith(expected + "\n")


# --- 6. QLoRA ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_qlora_4bit_step(family, released_vlm, images, tmp_path):
    model = load_base(ModelArguments(vlm_model=released_vlm(family), bits=4, **LORA))
    modules = dict(model.named_modules())
    quantized = {model.component(n) for n, m in modules.items() if isinstance(m, bnb.nn.Linear4bit)}
    # The tower and the connector stay floating point (the skip list); the LLM's linears are 4-bit.
    assert quantized == {"llm"}, f"4-bit linear layers in {sorted(quantized)}"
    assert not any(is_quantized(p) for n, p in model.named_parameters() if model.component(n) != "llm")
    assert not isinstance(modules["vlm.base_model.model.lm_head"], bnb.nn.Linear4bit)

    args = model.build_args
    rows = apply_freeze_policy(model, args)
    assert {r.component: r.mode for r in rows} == {"vision": "frozen", "connector": "full", "llm": "qlora"}
    batch = model_batch(model, args, conversations(images))
    frozen_4bit = {n: p.detach().clone() for n, p in model.named_parameters() if is_quantized(p)}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    lora = {n: p for n, p in model.named_parameters() if is_lora(n)}
    assert lora and all(p.grad is not None for p in lora.values())
    assert all(p.grad.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
    optimizer.step()
    assert all(not torch.equal(p, before[n]) for n, p in lora.items() if "lora_B" in n)
    assert all(torch.equal(p, frozen_4bit[n]) for n, p in model.named_parameters() if n in frozen_4bit)

    save_checkpoint(model, str(tmp_path), load_released_processor(args))
    loaded, *_ = load_checkpoint(str(tmp_path))
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=1e-5, rtol=0)


# --- 7. activation checkpointing ---------------------------------------------------------------


def gradients(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpointing_with_a_frozen_tower_keeps_no_tower_activations(family, released_vlm, images):
    model, args, _ = build(released_vlm(family), **LORA)
    perturb_lora(model)
    batch = model_batch(model, args, conversations(images))
    loss, grads = gradients(model, batch)

    model.activation_checkpointing_enable()
    assert model.base.is_activation_checkpointing
    outputs = []
    hooks = [
        module.register_forward_hook(lambda m, i, out, name=name: outputs.append((name, out)))
        for name, module in model.named_modules()
        if model.component(name) == "vision" and not list(module.children())
    ]
    try:
        checkpointed_loss, checkpointed_grads = gradients(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
    tensors = [(n, t) for n, out in outputs for t in (out if isinstance(out, tuple) else (out,)) if torch.is_tensor(t)]
    assert tensors, "the tower never ran"
    keeping = sorted({n for n, t in tensors if t.requires_grad})
    assert not keeping, f"the frozen tower runs with autograd (its activations are kept): {keeping[:3]}"
    torch.testing.assert_close(checkpointed_loss, loss, atol=1e-6, rtol=0)
    assert checkpointed_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpointing_with_vision_lora_trains_the_tower_adapters(family, released_vlm, images):
    model, args, _ = build(released_vlm(family), **LORA, lora_target="vit")
    batch = model_batch(model, args, conversations(images))
    loss, grads = gradients(model, batch)
    model.activation_checkpointing_enable()
    assert model.base.is_activation_checkpointing
    checkpointed_loss, checkpointed_grads = gradients(model, batch)

    torch.testing.assert_close(checkpointed_loss, loss, atol=1e-6, rtol=0)
    assert checkpointed_grads.keys() == grads.keys()
    vision_b = [n for n in checkpointed_grads if "lora_B" in n and model.component(n) == "vision"]
    assert vision_b and all(checkpointed_grads[n].abs().sum() > 0 for n in vision_b)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_lora_trained_with_checkpointing_round_trips(family, released_vlm, images, tmp_path):
    """A step of vision LoRA + connector under activation checkpointing, saved and loaded by the
    one loader: the adapter holds the tower's LoRA only, the delta the connector only, and the
    loaded model gives the trained model's logits."""
    model, args, _ = build(released_vlm(family), **LORA, lora_target="vit")
    model.activation_checkpointing_enable()
    batch = model_batch(model, args, conversations(images))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(**batch).loss.backward()
    optimizer.step()
    save_checkpoint(model, str(tmp_path), load_released_processor(args))

    adapter = load_file(os.path.join(tmp_path, "adapter", "adapter_model.safetensors"))
    assert adapter and {part_of(family, k) for k in adapter} == {"vision"}
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)
    assert {part_of(family, n) for n in load_file(os.path.join(tmp_path, DELTA))} == {"connector"}
    loaded, *_ = load_checkpoint(str(tmp_path))
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=1e-5, rtol=0)


# --- 8. every trainable weight gets a gradient, text-only batches included (DDP's rule) ---------


@pytest.mark.parametrize("recipe", ["lora", "full", "vision_lora", "full_tower"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_trainable_parameter_gets_a_gradient(family, recipe, released_vlm, images):
    """train.py runs DDP with find_unused_parameters=False (TrainArguments): a trainable
    parameter that one backward leaves without a gradient stops a multi-rank run at its second
    step ("Expected to have finished reduction in the prior iteration")."""
    model, args, _ = build(released_vlm(family), **RECIPES[recipe][0])
    _, grads = gradients(model, model_batch(model, args, conversations(images)))
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in grads]
    assert not missing, f"{len(missing)} trainable parameters get no gradient: {missing[:4]}"


TEXT_ONLY_FAMILIES = ("llava", "qwen2_5_vl", "smolvlm", "minicpmv4_6")  # PaliGemma's processor needs an image


@pytest.mark.parametrize("recipe", ["lora", "vision_lora"])
@pytest.mark.parametrize("family", TEXT_ONLY_FAMILIES)
def test_text_only_batch_runs_the_image_path(family, recipe, released_vlm):
    """A batch without images still gives every trainable weight of the image path a (zero)
    gradient, else a DDP rank holding it waits for the others forever; its loss is unchanged."""
    model, args, _ = build(released_vlm(family), **RECIPES[recipe][0])
    perturb_lora(model)
    batch = model_batch(model, args, TEXT_ONLY)
    assert not any(k.startswith("pixel_values") for k in batch)
    model.train()
    theirs = model.vlm(**batch).loss
    loss, grads = gradients(model, batch)
    torch.testing.assert_close(loss, theirs.detach(), atol=1e-5, rtol=0)
    image_path = [n for n, p in model.named_parameters() if p.requires_grad and model.component(n) in ("vision", "connector")]
    assert image_path and {model.component(n) for n in image_path} >= {"connector"}
    missing = [n for n in image_path if n not in grads]
    assert not missing, missing[:4]
    assert all(not grads[n].any() for n in image_path), "a text-only batch moved the image path"


def test_paligemma_text_only_record_trains_or_is_refused_before_step_1(released_vlm, released_data, tmp_path):
    """Text-only records are legal (README). A family whose processor cannot take one must say so
    in the data check, naming the record, not fail inside the DataLoader with a traceback."""
    out = str(tmp_path / "out")
    argv = train_argv(released_vlm("paligemma"), {**released_data, "train": released_data["mixed"]}, out,
                      str(tmp_path / "cache"), *RECIPE_FLAGS["lora"], "--per_device_train_batch_size", "1")
    try:
        train.main(argv)
    except Exception as error:  # noqa: BLE001 - which kind it is, is the assertion
        assert is_user_error(error) and "text-only" in str(error), f"not a user error naming the record: {error!r}"
        assert not os.path.exists(os.path.join(out, DELTA))
    else:
        assert os.path.isfile(os.path.join(out, DELTA))

