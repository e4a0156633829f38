"""--packing true: samples laid end to end in rows see nothing of each other, and train as alone.

For the composed base and every released family of fixtures/tiny_vlms.py that packs (the others are
refused, naming the family), in fp32: each sample's logits, its loss and the trainable weights'
gradients, packed with others in a row, equal the same sample run alone within 1e-5; changing one
sample's tokens changes no other's logits; the whole packed batch has the padded batch's loss and
supervised-token count. Both attention kernels with a mask (sdpa, eager) are run. The checks are
shown to catch a broken isolation: positions not restarted, and M-RoPE given 2-D positions.
The sampler's plan (rows within the packing length, every sample once, the same on every rank,
deterministic) and, per base, a packed run cut off while saving and resumed (slow) are tested below.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import tiny_model_args
from transformers import LlamaConfig

from config import DataArguments, TrainArguments, check_packing
from constants import IGNORE_INDEX
from data.packing import PackedBatchSampler, PackingCollator, best_fit_rows, contiguous_rows
from errors import ConfigError
from fixtures.tiny_vlms import FAMILIES
from model import released as released_module
from model.components import PACKING_POSITIONS
from model.freeze import apply_freeze_policy
from model.memory_plan import format_plan, plan_memory
from model.packing import check_packing as check_model_packing
from model.settings import ModelArguments
from run.checkpoint import DELTA, load_base
from run.inputs import model_inputs
from run.run_folder import COMPLETE

TOLERANCE = 1e-5
PACKABLE = [f for f in FAMILIES if f in PACKING_POSITIONS]
CASES = ["composed", *PACKABLE]


@pytest.fixture(scope="module")
def case(tiny_base, released_vlm, released_data):
    """`case(name)` -> (model, inputs, samples): the base with its LLM and connector training, and
    three samples (text-only, image, image) of different lengths, built once per name."""
    built = {}

    def make(name):
        if name not in built:
            margs = tiny_model_args(tiny_base, freeze_llm=False) if name == "composed" else \
                ModelArguments(vlm_model=released_vlm(name), freeze_llm=False)
            model = load_base(margs)
            apply_freeze_policy(model, margs)
            inputs = model_inputs(model, margs)
            folder = released_data["image_folder"]
            train = inputs.training_set(DataArguments(data_path=released_data["train"], image_folder=folder), None)
            mixed = inputs.training_set(DataArguments(data_path=released_data["mixed"], image_folder=folder), None)
            built[name] = model, inputs, [mixed[1], train[0], train[1]]
        return built[name]

    return make


def set_kernel(model, kernel: str) -> None:
    (model.llm if hasattr(model, "llm") else model.base).set_attn_implementation(kernel)


def pack(inputs, samples):
    """(packed batch, [(row, start, end)] per sample, each sample's own batch). Rows: the first two
    samples, then the third; the shorter row padded."""
    collator = inputs.collator(512)
    alone = [collator([s]) for s in samples]
    n = [a["input_ids"].shape[1] for a in alone]
    capacity = max(n[0] + n[1], n[2])
    packed = PackingCollator(collator, capacity, 2, inputs.text_tokenizer.pad_token_id or 0)(samples)
    assert packed["input_ids"].shape == (2, capacity) and "attention_mask" not in packed
    return packed, [(0, 0, n[0]), (0, n[0], n[0] + n[1]), (1, 0, n[2])], alone


@torch.no_grad()
def logits(model, batch):
    model.eval()
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def logit_errors(model, packed, spans, alone) -> list[float]:
    """Per sample: the largest difference of its logits packed and alone."""
    out = logits(model, packed)
    return [float((out[r, a:b] - logits(model, own)[0]).abs().max()) for (r, a, b), own in zip(spans, alone, strict=True)]


def loss_and_gradients(model, batch):
    """The training step's loss (divided by the batch's supervised tokens, as the Trainer's
    num_items_in_batch does) and every trainable weight's gradient."""
    model.train()
    model.zero_grad(set_to_none=True)
    items = (batch["labels"] != IGNORE_INDEX).sum()
    loss = model(**batch, num_items_in_batch=items).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def only_labels_of(packed, span):
    """The packed batch with every label but this sample's ignored."""
    row, a, b = span
    labels = torch.full_like(packed["labels"], IGNORE_INDEX)
    labels[row, a:b] = packed["labels"][row, a:b]
    return {**packed, "labels": labels}


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
@pytest.mark.parametrize("name", CASES)
def test_each_packed_sample_has_its_own_logits_loss_and_gradients(case, name, kernel):
    model, inputs, samples = case(name)
    set_kernel(model, kernel)
    try:
        packed, spans, alone = pack(inputs, samples)
        assert max(logit_errors(model, packed, spans, alone)) < TOLERANCE
        for span, own in zip(spans, alone, strict=True):
            loss, grads = loss_and_gradients(model, only_labels_of(packed, span))
            own_loss, own_grads = loss_and_gradients(model, own)
            torch.testing.assert_close(loss, own_loss, atol=TOLERANCE, rtol=0)
            assert grads.keys() == own_grads.keys() and grads
            for param, grad in grads.items():
                torch.testing.assert_close(grad, own_grads[param], atol=TOLERANCE, rtol=0, msg=param)
        # The whole batch: the padded batch's supervised tokens (num_items_in_batch) and loss.
        padded = inputs.collator(512)(samples)
        assert int((packed["labels"] != IGNORE_INDEX).sum()) == int((padded["labels"] != IGNORE_INDEX).sum())
        torch.testing.assert_close(loss_and_gradients(model, packed)[0], loss_and_gradients(model, padded)[0],
                                   atol=TOLERANCE, rtol=0)
    finally:
        set_kernel(model, "sdpa")


@pytest.mark.parametrize("name", CASES)
def test_changing_one_sample_changes_no_other_samples_logits(case, name):
    model, inputs, samples = case(name)
    packed, spans, _ = pack(inputs, samples)
    before = logits(model, packed)
    row, a, b = spans[0]  # the first sample of row 0: the second one comes after it
    changed = packed["input_ids"].clone()
    answer = packed["labels"][row, a:b] != IGNORE_INDEX
    changed[row, a:b][answer] = inputs.text_tokenizer("square", add_special_tokens=False).input_ids[0]
    assert not torch.equal(changed, packed["input_ids"])
    after = logits(model, {**packed, "input_ids": changed})
    assert (after[row, a:b] - before[row, a:b]).abs().max() > 1e-3  # the changed sample did change
    for r, start, end in spans[1:]:
        assert (after[r, start:end] - before[r, start:end]).abs().max() < TOLERANCE


@pytest.mark.parametrize("name", ["composed", "qwen2_5_vl"])
def test_the_check_catches_positions_not_restarted(case, name):
    """What the isolation rests on, broken on purpose: positions running on across the row (no
    packed mask is built, and the second sample sees the first)."""
    model, inputs, samples = case(name)
    packed, spans, alone = pack(inputs, samples)
    width = packed["input_ids"].shape[1]
    running = {**packed, "position_ids": torch.arange(width).expand(2, width).clone()}
    errors = logit_errors(model, running, spans, alone)
    assert errors[1] > 1e-3, errors


def test_the_check_catches_mrope_given_2d_positions(case, monkeypatch):
    """Qwen2.5-VL given the restarted [B, L] positions alone (no per-sample M-RoPE, no text row to
    build the mask from) expands them to 3-D and builds no packed mask: the trap of the peers."""
    model, inputs, samples = case("qwen2_5_vl")
    packed, spans, alone = pack(inputs, samples)
    monkeypatch.setattr(released_module, "packed_position_ids", lambda family, rope, batch: batch["position_ids"])
    assert logit_errors(model, packed, spans, alone)[1] > 1e-3


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in PACKING_POSITIONS])
def test_a_family_that_cannot_be_packed_is_refused_naming_it(family, released_vlm):
    model = load_base(ModelArguments(vlm_model=released_vlm(family)))
    with pytest.raises(ConfigError, match=f"cannot train {family}"):
        check_model_packing(model, rows_per_device=2)


def test_flash_attention_needs_one_row_and_an_untested_kernel_is_refused(case):
    model, _, _ = case("composed")
    check_model_packing(model, rows_per_device=4)  # sdpa

    def llm_with(kernel: str):  # a composed base as check_packing reads it: its LLM's config
        return SimpleNamespace(llm=SimpleNamespace(config=LlamaConfig(attn_implementation=kernel)))

    with pytest.raises(ConfigError, match="per_device_train_batch_size is 4"):
        check_model_packing(llm_with("flash_attention_2"), rows_per_device=4)
    check_model_packing(llm_with("flash_attention_2"), rows_per_device=1)  # one row: transformers' varlen path
    with pytest.raises(ConfigError, match="flex_attention"):
        check_model_packing(llm_with("flex_attention"), rows_per_device=1)
    with pytest.raises(ConfigError, match="linear_attention"):
        config = LlamaConfig(layer_types=["full_attention", "linear_attention"], num_hidden_layers=2)
        check_model_packing(SimpleNamespace(llm=SimpleNamespace(config=config)), rows_per_device=1)


def test_packing_settings_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="--packing_length 100"):
        DataArguments(packing=True, max_length=256, packing_length=100)
    assert DataArguments(packing=True, max_length=256).row_length == 256
    args = TrainArguments(output_dir="/tmp/x", train_sampling_strategy="group_by_length", report_to="none")
    with pytest.raises(ConfigError, match="--train_sampling_strategy group_by_length"):
        check_packing(DataArguments(packing=True), args)


# --- the plan of rows --------------------------------------------------------------------------


def test_best_fit_fills_rows_and_contiguous_rows_never_need_more():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 200, (500,), generator=g).tolist()
    rows = best_fit_rows(list(range(500)), lengths, 256)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 256 for row in rows)
    assert len(rows) <= 1.1 * sum(lengths) / 256 + 1  # nearly full
    order = [i for row in rows for i in row]
    assert len(contiguous_rows([lengths[i] for i in order], 256)) <= len(rows)


def test_the_plan_is_deterministic_the_same_on_every_rank_and_within_the_length():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(10, 300, (300,), generator=g).tolist()
    multimodal = [i % 5 != 0 for i in range(300)]
    ranks = [PackedBatchSampler(lengths, 512, 2, world_size=2, rank=r, seed=3, multimodal=multimodal) for r in (0, 1)]
    batches = [list(s) for s in ranks]
    assert len(batches[0]) == len(batches[1]) == len(ranks[0]) > 0
    assert batches[0] == list(PackedBatchSampler(lengths, 512, 2, world_size=2, rank=0, seed=3, multimodal=multimodal))
    seen = [i for rank in batches for batch in rank for i in batch]
    assert set(seen) == set(range(300)) and len(seen) - 300 < 4 * 512 // 10  # only the last step's filler repeats
    steps = ranks[0].steps(0)
    assert all(sum(lengths[i] for i in row) <= 512 for step in steps for row in step)
    # One kind of sample per step, but for the last one (the leftovers of both).
    assert all(len({multimodal[i] for row in step for i in row}) == 1 for step in steps[:-1])
    ranks[0].set_epoch(1)
    assert list(ranks[0]) != batches[0]  # a new order each epoch


# --- the run -----------------------------------------------------------------------------------


def test_dry_run_plans_packed_rows(case):
    model, _, _ = case("composed")
    padded = plan_memory(model, 2, 256, gradient_checkpointing=False, padded=False)
    packed = plan_memory(model, 2, 256, gradient_checkpointing=False, packed=True)
    assert "packed rows" in format_plan(packed) and packed.activations > padded.activations  # the mask


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_a_packed_run_resumed_from_its_mid_checkpoint_ends_on_the_whole_runs_weights(
    name, tiny_base, released_vlm, released_data, tmp_path, capsys
):
    """Every packable base: 4 packed steps (LoRA on the LLM, the connector) with checkpoints at 2 and 4,
    and the folder a run killed while saving step 4 leaves (checkpoint-2 complete, checkpoint-4
    without its completion mark, no final delta), resumed: 2 steps trained, the same final weights,
    bit for bit. train.py's code in this process; a real SIGKILL mid-run and its folder:
    tests/test_resume.py (the checkpoint lifecycle is the same packed or not)."""
    import shutil

    from helpers import LORA_AND_CONNECTOR
    from safetensors.torch import load_file

    import train

    base = ["--vision_model", tiny_base["vision"], "--llm_model", tiny_base["llm"]] if name == "composed" else \
        ["--vlm_model", released_vlm(name)]
    argv = [*base, *LORA_AND_CONNECTOR, "--data_path", released_data["train"],
            "--image_folder", released_data["image_folder"], "--data_check_cache", str(tmp_path / "cache"),
            "--packing", "true", "--max_length", "512", "--per_device_train_batch_size", "2",
            "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--learning_rate", "1e-2",
            "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true", "--seed", "0",
            "--dataloader_num_workers", "0"]

    def trained_steps(*extra: str) -> int:
        capsys.readouterr()
        train.main([*argv, *extra])
        return capsys.readouterr().out.count("'loss':")

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert trained_steps("--output_dir", str(whole)) == 4
    shutil.copytree(whole / "checkpoint-2", cut / "checkpoint-2")
    shutil.copytree(whole / "checkpoint-4", cut / "checkpoint-4", ignore=shutil.ignore_patterns(COMPLETE))
    assert trained_steps("--output_dir", str(cut), "--resume_from_checkpoint", "true") == 2
    expected, got = load_file(str(whole / DELTA)), load_file(str(cut / DELTA))
    assert expected.keys() == got.keys() and expected
    changed = load_file(str(whole / "checkpoint-2" / DELTA))
    assert any(not torch.equal(changed[k], t) for k, t in expected.items()), "steps 3-4 changed no weight"
    assert [k for k, t in expected.items() if not torch.equal(got[k], t)] == []
