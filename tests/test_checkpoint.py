"""Delta checkpoints: every recipe round-trips to the same logits, the delta holds only what
trained, and the one loader refuses every kind of garbage with a message that names it."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from helpers import tiny_model_args
from safetensors.torch import load_file, save_file
from torch import nn

from fixtures.synthetic import vocabulary
from fixtures.tiny_base import make_tiny_base
from model.build import load_tokenizer_and_image_processor
from model.freeze import apply_freeze_policy, is_lora
from model.vlm import IMAGE_TOKEN_INDEX
from run.checkpoint import (
    ADAPTERS,
    DELTA,
    MANIFEST,
    CheckpointError,
    load_base,
    load_checkpoint,
    load_delta,
    save_checkpoint,
)
from run.fingerprint import fingerprint
from run.run_folder import COMPLETE, latest_checkpoint, prune_checkpoints

LORA = dict(lora_enable=True, lora_r=4, lora_alpha=8)
RECIPES = {
    "connector_only": dict(),  # the defaults: tower and LLM frozen, connector trains
    "full_llm": dict(freeze_llm=False),
    "full_vit": dict(freeze_vit=False),  # the pruned tower's weights go into the delta
    "lora_llm": dict(LORA),
    "lora_vit": dict(LORA, lora_target="vit"),
    "resampler_lora": dict(LORA, connector="resampler", resampler_num_queries=16, resampler_num_heads=4),
    "qlora_4bit": dict(LORA, bits=4),
}


def tiny_batch(model, seed: int = 0) -> dict:
    """Two rows: 4 text tokens, the image tokens, 8 text tokens; labels on the text only."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(5, 300, (2, 12), generator=g)
    image = torch.full((2, model.num_image_tokens), IMAGE_TOKEN_INDEX)
    input_ids = torch.cat([text[:, :4], image, text[:, 4:]], dim=1)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(2, 3, 48, 48, generator=g),
        "labels": input_ids.masked_fill(input_ids == IMAGE_TOKEN_INDEX, -100),
    }


def train_steps(model, batch: dict, steps: int = 2) -> None:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@torch.no_grad()
def logits(model, batch: dict) -> torch.Tensor:
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs).logits.float()


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def param_bytes(model, names) -> int:
    params = dict(model.named_parameters())
    return sum(params[n].numel() * params[n].element_size() for n in names)


def build_trained(args, batch_seed: int = 0):
    """Built, frozen by the policy, trained two steps; returns (model, batch, trained snapshot)."""
    model = load_base(args)
    apply_freeze_policy(model, args)
    batch = tiny_batch(model, batch_seed)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train_steps(model, batch)
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed, "training changed nothing: the round trip below would prove nothing"
    return model, batch


def assert_round_trip(model, batch, ckpt_dir, delta_param_names):
    expected = logits(model, batch)
    loaded, _, manifest = load_checkpoint(ckpt_dir)
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-5, rtol=0)
    # Only the delta is on disk: its tensors exactly, plus adapters, configs and the template.
    limit = param_bytes(model, delta_param_names) * 1.01 + 2**20
    assert folder_bytes(ckpt_dir) <= limit, f"{folder_bytes(ckpt_dir)} bytes on disk > {limit:.0f}"
    return loaded, manifest


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_round_trip_reproduces_logits(recipe, tiny_base, tmp_path):
    args = tiny_model_args(tiny_base, **RECIPES[recipe])
    model, batch = build_trained(args)
    tokenizer, _ = load_tokenizer_and_image_processor(args)
    save_checkpoint(model, str(tmp_path), tokenizer)

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    loaded, manifest = assert_round_trip(model, batch, str(tmp_path), trainable)
    # The delta file holds exactly the trained non-LoRA tensors; LoRA lives in the adapters.
    assert set(load_file(str(tmp_path / DELTA))) == {n for n in trainable if not is_lora(n)}
    assert manifest["adapters"] == sorted(
        ADAPTERS[c] for c, on in (("llm", args.lora_on_llm), ("vision", args.lora_on_vit)) if on
    )
    assert not any(p.requires_grad for p in loaded.parameters()), "a loaded model is for inference"


def test_freeze_lora_stage_two_stands_alone(tiny_base, tmp_path):
    """Stage 1 trains LoRA + connector (+ the tower's pre-norm); stage 2 keeps that LoRA and
    pre-norm frozen and trains the connector on. Stage 2's checkpoint holds all of it (the
    combined delta) and loads without stage 1."""
    stage1_dir, stage2_dir = str(tmp_path / "stage1"), str(tmp_path / "stage2")
    inherited_only = {"vision.encoder.pre_layrnorm.weight", "vision.encoder.pre_layrnorm.bias"}
    args1 = tiny_model_args(tiny_base, **LORA, trainable_regex=[r"pre_layrnorm"])
    stage1, _ = build_trained(args1)
    tokenizer, _ = load_tokenizer_and_image_processor(args1)
    save_checkpoint(stage1, stage1_dir, tokenizer)

    args2 = tiny_model_args(tiny_base, **LORA, freeze_lora=True)
    stage2 = load_base(args2)
    load_delta(stage2, stage1_dir, new_adapters_ok=True)  # what --init_from does
    apply_freeze_policy(stage2, args2)
    assert not any(p.requires_grad for n, p in stage2.named_parameters() if is_lora(n) or n in inherited_only)
    lora_before = {n: p.detach().clone() for n, p in stage2.named_parameters() if is_lora(n)}
    batch = tiny_batch(stage2, seed=1)
    train_steps(stage2, batch, steps=1)
    assert all(torch.equal(p, lora_before[n]) for n, p in stage2.named_parameters() if is_lora(n))
    save_checkpoint(stage2, stage2_dir, tokenizer, parent=stage1_dir)
    stage1_lora = load_file(os.path.join(stage1_dir, ADAPTERS["llm"], "adapter_model.safetensors"))
    shutil.rmtree(stage1_dir)  # stage 2 must not need it

    delta = [n for n, p in stage2.named_parameters() if p.requires_grad or is_lora(n) or n in inherited_only]
    loaded, manifest = assert_round_trip(stage2, batch, stage2_dir, delta)
    assert inherited_only <= set(load_file(os.path.join(stage2_dir, DELTA)))
    assert manifest["parent"] == stage1_dir
    stage2_lora = load_file(os.path.join(stage2_dir, ADAPTERS["llm"], "adapter_model.safetensors"))
    assert stage2_lora.keys() == stage1_lora.keys()
    assert all(torch.equal(stage2_lora[k], stage1_lora[k]) for k in stage1_lora)
    assert any(v.abs().sum() > 0 for k, v in stage2_lora.items() if "lora_B" in k), "LoRA never trained"


# --- refusals -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_lora(tiny_base, tmp_path_factory) -> dict:
    """A LoRA + connector checkpoint on the seed-0 base, and its logits on a batch."""
    args = tiny_model_args(tiny_base, **LORA)
    model, batch = build_trained(args)
    path = str(tmp_path_factory.mktemp("saved_lora"))
    save_checkpoint(model, path, load_tokenizer_and_image_processor(args)[0])
    return {"path": path, "batch": batch, "logits": logits(model, batch), "fingerprint": model.base_fingerprint}


@pytest.fixture(scope="module")
def ckpt_base_seed1(tmp_path_factory) -> dict:
    """The same tiny config as `tiny_base`, another seed: other weights."""
    return make_tiny_base(str(tmp_path_factory.mktemp("ckpt_base_seed1")), vocabulary(), seed=1)


@pytest.fixture
def copy_of(saved_lora, tmp_path):
    path = str(tmp_path / "ckpt")
    shutil.copytree(saved_lora["path"], path)
    return path


def test_other_base_is_refused_naming_both_fingerprints(saved_lora, ckpt_base_seed1, tiny_base):
    other = load_base(tiny_model_args(ckpt_base_seed1)).base_fingerprint
    trained_on = saved_lora["fingerprint"]
    assert other["llm"] != trained_on["llm"] and other["vision"] != trained_on["vision"]
    with pytest.raises(CheckpointError, match="fingerprint mismatch") as error:
        load_checkpoint(saved_lora["path"], base_vision=ckpt_base_seed1["vision"], base_llm=ckpt_base_seed1["llm"])
    for component in ("vision", "llm"):
        assert trained_on[component] in str(error.value) and other[component] in str(error.value)


def test_allow_base_mismatch_loads_with_a_loud_warning(saved_lora, ckpt_base_seed1, capsys):
    model, *_ = load_checkpoint(
        saved_lora["path"], base_llm=ckpt_base_seed1["llm"], allow_base_mismatch=True
    )
    printed = capsys.readouterr()
    warning = printed.out + printed.err
    assert "WARNING" in warning and saved_lora["fingerprint"]["llm"] in warning
    assert model.base_fingerprint["llm"] in warning
    # It did load the delta: the connector is the trained one, not a fresh random init.
    delta = load_file(os.path.join(saved_lora["path"], DELTA))
    assert torch.equal(model.connector.linear_1.weight, delta["connector.linear_1.weight"])


def test_same_base_elsewhere_loads(saved_lora, tiny_base, tmp_path):
    """--base_llm pointing at another copy of the same base passes the fingerprint check."""
    shutil.copytree(tiny_base["llm"], tmp_path / "llm_copy")
    model, *_ = load_checkpoint(saved_lora["path"], base_llm=str(tmp_path / "llm_copy"))
    torch.testing.assert_close(logits(model, saved_lora["batch"]), saved_lora["logits"], atol=1e-5, rtol=0)


def rewrite_delta(path: str, change) -> None:
    tensors = load_file(os.path.join(path, DELTA))
    change(tensors)
    save_file(tensors, os.path.join(path, DELTA))


def test_fingerprint_samples_the_last_value_of_a_real_sized_table():
    """Qwen2.5's embedding table is 136M values, Vicuna's 131M: over 2^24, where a float32 index
    rounds past the end. The last value is sampled, and a change there changes the fingerprint."""
    table = nn.Embedding(1, 2**25 + 4)  # 2^25 + 3, the last index, is not a float32
    torch.nn.init.zeros_(table.weight)
    before = fingerprint(table)
    with torch.no_grad():
        table.weight[0, -1] = 1.0
    assert fingerprint(table) != before


def test_missing_tensor_is_refused(copy_of):
    rewrite_delta(copy_of, lambda t: t.pop("connector.linear_2.bias"))
    with pytest.raises(CheckpointError, match=r"absent from delta.safetensors.*connector\.linear_2\.bias"):
        load_checkpoint(copy_of)


def test_unknown_tensor_is_refused(copy_of):
    rewrite_delta(copy_of, lambda t: t.update({"connector.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"not parameters of the rebuilt model.*connector\.extra\.weight"):
        load_checkpoint(copy_of)


def test_wrong_shape_is_refused(copy_of):
    rewrite_delta(copy_of, lambda t: t.update({"connector.linear_1.weight": torch.zeros(128, 32)}))
    with pytest.raises(CheckpointError, match=r"shape mismatch.*connector\.linear_1\.weight \(128, 32\) vs model \(128, 64\)"):
        load_checkpoint(copy_of)


def test_truncated_file_is_refused(copy_of):
    path = os.path.join(copy_of, DELTA)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as error:
        load_checkpoint(copy_of)
    assert path in str(error.value)


def edit_manifest(path: str, change) -> None:
    with open(os.path.join(path, MANIFEST)) as f:
        manifest = json.load(f)
    change(manifest)
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump(manifest, f)


def test_future_format_version_is_refused(copy_of):
    edit_manifest(copy_of, lambda m: m.update(format_version=999))
    with pytest.raises(CheckpointError, match="format_version 999"):
        load_checkpoint(copy_of)


def test_folder_without_manifest_is_refused(copy_of):
    os.remove(os.path.join(copy_of, MANIFEST))
    with pytest.raises(CheckpointError, match=f"has no {MANIFEST}"):
        load_checkpoint(copy_of)


def test_missing_adapter_folder_is_refused(copy_of):
    shutil.rmtree(os.path.join(copy_of, ADAPTERS["llm"]))
    with pytest.raises(CheckpointError, match=f"{ADAPTERS['llm']}.*is missing"):
        load_checkpoint(copy_of)


def test_recipe_without_its_lora_is_refused(copy_of):
    """The manifest lists an adapter but its recipe was edited to have no LoRA: not silently dropped."""
    edit_manifest(copy_of, lambda m: m["model_args"].update(lora_enable=False))
    with pytest.raises(CheckpointError, match=r"holds adapters \['llm_adapter'\]"):
        load_checkpoint(copy_of)


def test_latest_checkpoint_skips_unfinished_saves(tmp_path):
    assert latest_checkpoint(str(tmp_path / "absent")) is None

    def make(name, *files):
        os.makedirs(tmp_path / name)
        for f in files:
            (tmp_path / name / f).write_text("{}")

    make("checkpoint-2", MANIFEST, "trainer_state.json", COMPLETE)
    make("checkpoint-7", MANIFEST, "trainer_state.json")  # cut off before the completion mark
    make("checkpoint-9", "trainer_state.json", DELTA)  # cut off earlier
    make("checkpoint-final", MANIFEST, "trainer_state.json", COMPLETE)  # not a step folder
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    make("checkpoint-11", MANIFEST, "trainer_state.json", COMPLETE)
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-11")


def test_prune_keeps_newest_complete_and_drops_leftovers(tmp_path):
    for step, complete in ((2, True), (4, True), (5, False), (6, True), (8, False)):
        os.makedirs(tmp_path / f"checkpoint-{step}")
        if complete:
            (tmp_path / f"checkpoint-{step}" / COMPLETE).write_text("ok")
    prune_checkpoints(str(tmp_path), keep=1)
    # 6 is the newest good one; 8 may be a save in progress; 2, 4 are over the limit; 5 is debris.
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-6", "checkpoint-8"]


def test_init_from_may_add_lora_but_never_drop_it(saved_lora, tiny_base):
    # A LoRA stage may start from a parent without LoRA (LLaVA: pretrain -> LoRA finetune) ...
    vision_lora_only = load_base(tiny_model_args(tiny_base, **LORA, lora_target="vit"))
    with pytest.raises(CheckpointError, match="holds adapters"):
        # ... but a stage without the parent's LLM adapter would silently drop trained weights.
        load_delta(vision_lora_only, saved_lora["path"], new_adapters_ok=True)
    with_more_lora = load_base(tiny_model_args(tiny_base, **LORA, lora_target="both"))
    load_delta(with_more_lora, saved_lora["path"], new_adapters_ok=True)
    vision_lora_b = [p for n, p in with_more_lora.vision.named_parameters() if "lora_B" in n]
    assert vision_lora_b and all(torch.all(p == 0) for p in vision_lora_b)  # fresh, PEFT's init
    parent = load_file(os.path.join(saved_lora["path"], "llm_adapter", "adapter_model.safetensors"))
    loaded = {n: p for n, p in with_more_lora.llm.named_parameters() if "lora_" in n}
    assert any(torch.equal(loaded[n], t) for n in loaded for t in parent.values() if t.shape == loaded[n].shape)
