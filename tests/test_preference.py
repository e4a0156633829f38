"""`--stage dpo` (docs/preference_tuning.md): the three record shapes read as one pair, bad pairs
refused by name, one vision pass per pair equal to each row's own forward on every family, the
step-0 reference cached with the data equal to a live reference forward (base + --init_from delta),
TRL's DPOTrainer loss on the same batch, the memory plan, and a tiny model that learns from pairs
after a brief SFT."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess

import pytest
import torch
from helpers import REPO_ROOT, SUBPROCESS_ENV, make_color_set, tiny_model_args, torchrun_train
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import set_seed

import run.preference
import train
from config import DataArguments, ModelArguments, TrainArguments
from constants import IGNORE_INDEX
from data.preference import as_pair, pair_files, refuse_bad_pairs
from data.prompt import llava_to_messages
from data.records import DataError, iter_records
from fixtures.preference import pair_record, write_pairs
from fixtures.tiny_vlms import FAMILIES
from model.freeze import apply_freeze_policy
from model.preference import dpo_loss
from run.checkpoint import ADAPTERS, DELTA, MANIFEST, load_base, load_checkpoint
from run.inputs import model_inputs
from run.predict import accuracy
from run.preference import REFERENCE_FILE, compute_reference_logps, preference_data

BETA, SFT_WEIGHT = 0.1, 0.5
CPU_ARGS = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--dtype", "float32", "--bf16", "false",
            "--report_to", "none", "--save_strategy", "no", "--dataloader_num_workers", "0", "--logging_steps", "1",
            "--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def pairs(demo_data, tmp_path_factory) -> str:
    """Pairs of the demo records' first questions, the three record shapes in turn."""
    path = str(tmp_path_factory.mktemp("pairs") / "pairs.json")
    return write_pairs(demo_data["train"], path, shapes=("rlaif_v", "trl", "llava"), limit=6)


def _write(path, records) -> str:
    with open(path, "w") as f:
        json.dump(records, f)
    return str(path)


# --- the data --------------------------------------------------------------------------------


def test_the_three_record_shapes_read_as_one_pair(demo_data, tmp_path):
    with open(demo_data["train"]) as f:
        record = json.load(f)[0]
    shapes = [pair_record(record, "blue", shape) for shape in ("rlaif_v", "trl", "llava")]
    read = [as_pair(raw)[0] for raw in iter_records(_write(tmp_path / "p.json", shapes))]
    messages = [llava_to_messages(p.as_llava(p.chosen)["conversations"], len(p.image)) for p in read]
    assert messages[0] == messages[1] == messages[2]
    assert messages[0][-1] == {"role": "assistant", "content": record["conversations"][1]["value"]}
    assert {p.rejected for p in read} == {"blue"} and {tuple(p.image) for p in read} == {(record["image"],)}


def test_bad_pairs_are_refused_by_name_and_skipped_on_request(demo_data, tmp_path):
    with open(demo_data["train"]) as f:
        good = [pair_record(r, "blue", "rlaif_v") for r in json.load(f)[:2]]
    same = {**good[0], "id": "same", "rejected": good[0]["chosen"] + " "}
    empty = {**good[0], "id": "empty", "rejected": "  "}
    unknown = {"id": "unknown", "image": good[0]["image"], "text": "a caption"}
    path = _write(tmp_path / "pairs.json", [*good, same, empty, unknown])
    files = pair_files(path, str(tmp_path / "out"))
    assert [rid for _, rid, _ in files.problems] == ["same", "empty", "unknown"]
    with pytest.raises(DataError) as refusal:
        refuse_bad_pairs(files, path, skip_bad_samples=False, output_dir=None)
    for name in ("id same", "the same answer", "id empty", "rejected answer is empty", "id unknown", "RLAIF-V"):
        assert name in str(refusal.value)
    refuse_bad_pairs(files, path, skip_bad_samples=True, output_dir=str(tmp_path))
    assert files.positions == [0, 1]
    with open(tmp_path / "skipped_pairs.jsonl") as f:
        assert [json.loads(line)["id"] for line in f] == ["same", "empty", "unknown"]


def test_a_rejected_answer_the_supervised_check_refuses_names_its_record(demo_data, tiny_base, tmp_path):
    with open(demo_data["train"]) as f:
        records = [pair_record(r, "blue", "rlaif_v") for r in json.load(f)[:2]]
    records[1] = {**records[1], "id": "marker-in-answer", "rejected": "<image> blue"}
    model, args, inputs = build("composed", tiny_base, None)
    data_args = DataArguments(data_path=_write(tmp_path / "p.json", records), image_folder=demo_data["image_folder"],
                              data_check_cache=str(tmp_path / "cache"), max_length=256)
    with pytest.raises(DataError, match="marker-in-answer"):
        preference_data(inputs, data_args, TrainArguments(output_dir=str(tmp_path / "run"), report_to="none"))


# --- one vision pass per pair, equal to each row's own forward --------------------------------


def build(kind: str, tiny_base, released_vlm, **overrides):
    """(model, args, inputs) in eval mode: the composed tiny base or a released family, all trainable."""
    if kind == "composed":
        args = tiny_model_args(tiny_base, freeze_vit=False, freeze_llm=False, **overrides)
    else:
        args = ModelArguments(vlm_model=released_vlm(kind), freeze_llm=False, **overrides)
    model = load_base(args)
    apply_freeze_policy(model, args)
    return model.eval(), args, model_inputs(model, args)


def pair_dataset(inputs, pairs_path, image_folder, out):
    data_args = DataArguments(data_path=pairs_path, image_folder=image_folder, data_check_cache=str(out / "cache"),
                              max_length=512)
    return preference_data(inputs, data_args, TrainArguments(output_dir=str(out), report_to="none"))


@torch.no_grad()
def own_logps(model, collator, item) -> torch.Tensor:
    """One conversation's answer log-prob by the model's own forward on its own row and images."""
    batch = collator([item])
    labels = batch.pop("labels")[:, 1:]  # [1, L - 1]
    logits = model(**batch).logits.float()[:, :-1]  # [1, L - 1, V]
    picked = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (picked * (labels != IGNORE_INDEX)).sum()


def vision_calls(model, kind: str) -> list:
    """A list that grows by one at each forward of the vision tower."""
    calls: list = []
    if kind == "composed":
        towers = [model.vision]
    else:
        # The outermost module named as the vision component (Qwen's `model.visual`, merger inside).
        towers = [m for n, m in model.base.named_modules() if n.count(".") == 1 and model.component(n + ".x") == "vision"]
    for tower in towers:
        tower.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("kind", ["composed", *FAMILIES])
def test_a_pair_batch_runs_the_tower_once_and_equals_each_rows_own_forward(kind, tiny_base, released_vlm, pairs,
                                                                            demo_data, tmp_path):
    model, args, inputs = build(kind, tiny_base, released_vlm)
    dataset, collator = pair_dataset(inputs, pairs, demo_data["image_folder"], tmp_path)
    items = [dataset[i] for i in range(3)]
    calls = vision_calls(model, kind)
    with torch.no_grad():
        paired = model(**collator(items), pairs=True).logps  # [6]
        once = len(calls)
        model(**{k: v for k, v in inputs.collator(512)([i["chosen"] for i in items]).items() if k != "labels"})
    assert once >= 1 and len(calls) == 2 * once  # the pair batch ran the tower as the chosen rows alone do
    single = inputs.collator(512)
    expected = torch.stack([own_logps(model, single, i[half]) for half in ("chosen", "rejected") for i in items])
    torch.testing.assert_close(paired, expected, atol=1e-5, rtol=1e-5)


# --- the reference, cached at step 0 ----------------------------------------------------------


@pytest.fixture(scope="module")
def sft_checkpoint(tiny_base, demo_data, tmp_path_factory) -> str:
    """A brief supervised stage with LoRA on the LLM (and the connector): the DPO stage's --init_from."""
    out = str(tmp_path_factory.mktemp("sft"))
    train.main(["configs/demo.yaml", "--vision_model", tiny_base["vision"], "--llm_model", tiny_base["llm"],
                "--freeze_vit", "true", "--freeze_llm", "true", "--lora_enable", "true", "--lora_r", "8",
                "--lora_dropout", "0", "--data_path", demo_data["train"], "--image_folder", demo_data["image_folder"],
                "--eval_data_path", "", "--output_dir", out, "--max_steps", "4", "--disable_tqdm", "true"])
    return out


def dpo_argv(tiny_base, pairs, demo_data, out, *extra) -> list[str]:
    return ["configs/demo.yaml", "--vision_model", tiny_base["vision"], "--llm_model", tiny_base["llm"],
            "--freeze_vit", "true", "--freeze_llm", "true", "--lora_enable", "true", "--lora_r", "8",
            "--lora_dropout", "0", "--stage", "dpo", "--data_path", pairs, "--image_folder", demo_data["image_folder"],
            "--eval_data_path", "", "--output_dir", str(out), "--per_device_train_batch_size", "2",
            "--learning_rate", "1e-2", "--logging_steps", "1", "--disable_tqdm", "true", "--warmup_steps", "0", *extra]


def read_reference(out) -> torch.Tensor:
    with safe_open(os.path.join(out, REFERENCE_FILE), "pt") as f:
        return f.get_tensor("logps")


@pytest.mark.slow
def test_the_cached_reference_is_the_init_from_model_at_step_0_and_survives_a_resume(
        tiny_base, pairs, demo_data, sft_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "dpo"
    argv = dpo_argv(tiny_base, pairs, demo_data, out, "--init_from", sft_checkpoint, "--max_steps", "4",
                    "--save_strategy", "steps", "--save_steps", "2")
    train.main(argv)
    cached = read_reference(out)  # [pairs, 2]
    # A live reference: the SFT checkpoint through the one loader, each answer by the model's own forward.
    live_model, inputs, _ = load_checkpoint(sft_checkpoint)
    dataset, _ = pair_dataset(inputs, pairs, demo_data["image_folder"], tmp_path / "live")
    collator = inputs.collator(256)
    live = torch.tensor([[own_logps(live_model, collator, dataset[i][h]) for h in ("chosen", "rejected")]
                         for i in range(len(dataset))])
    torch.testing.assert_close(cached, live, atol=1e-5, rtol=0)
    # The run moved the policy away from it (the reference is not the trained model)...
    trained, _, _ = load_checkpoint(str(out))
    moved = torch.tensor([own_logps(trained, collator, dataset[i]["chosen"]) for i in range(len(dataset))])
    assert (moved - live[:, 0]).abs().max() > 1e-3
    # ... and a run cut off after checkpoint-2 resumes with the cached step-0 reference, not recomputing it.
    shutil.rmtree(out / "checkpoint-4")
    os.remove(out / MANIFEST)

    def recompute(*args, **kwargs):
        raise AssertionError("the reference was recomputed on resume")

    monkeypatch.setattr(run.preference, "compute_reference_logps", recompute)
    train.main([*argv, "--resume_from_checkpoint", "true"])
    assert torch.equal(read_reference(out), cached)
    with open(out / "trainer_state.json") as f:
        logged = [e for e in json.load(f)["log_history"] if "loss" in e]
    assert [e["step"] for e in logged] == [1, 2, 3, 4]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert all(name in e for e in logged)
    assert logged[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # step 1: policy == reference


@pytest.mark.slow
def test_qlora_dpo_trains_on_the_4bit_base_against_its_step_0_reference(tiny_base, pairs, demo_data, tmp_path):
    """QLoRA DPO: the LLM in 4-bit nf4 (bitsandbytes), LoRA on it. The cached reference is the 4-bit
    model at step 0 (LoRA's B starts at zero: the base itself), rebuilt here live within 1e-5; the
    run moves the policy off it, and its delta (LoRA and connector, no 4-bit weight) loads back."""
    out = tmp_path / "qlora_dpo"
    train.main(dpo_argv(tiny_base, pairs, demo_data, out, "--bits", "4", "--max_steps", "2"))
    with open(out / "freeze_table.txt") as f:
        table = {line.split()[0]: line.split()[1] for line in f.read().splitlines()[1:4]}
    assert (table["vision"], table["connector"], table["llm"]) == ("frozen", "full", "qlora")

    args = tiny_model_args(tiny_base, bits=4, lora_enable=True, lora_r=8, lora_dropout=0.0)
    set_seed(0)  # demo.yaml's seed, set by train.py before it builds the model: the same new connector
    live_model = load_base(args)
    apply_freeze_policy(live_model, args)
    live_model.eval()
    inputs = model_inputs(live_model, args)
    dataset, _ = pair_dataset(inputs, pairs, demo_data["image_folder"], tmp_path / "live")
    collator = inputs.collator(256)
    live = torch.tensor([[own_logps(live_model, collator, dataset[i][h]) for h in ("chosen", "rejected")]
                         for i in range(len(dataset))])
    cached = read_reference(out)  # [pairs, 2]
    torch.testing.assert_close(cached, live, atol=1e-5, rtol=0)

    trained, _, _ = load_checkpoint(str(out))
    moved = torch.tensor([own_logps(trained, collator, dataset[i]["chosen"]) for i in range(len(dataset))])
    assert (moved - live[:, 0]).abs().max() > 1e-4
    delta = load_file(out / DELTA)
    assert delta and all("connector" in name for name in delta)
    adapter = load_file(out / ADAPTERS["llm"] / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)  # LoRA only: no 4-bit base weight saved
    with open(out / "trainer_state.json") as f:
        logged = [e for e in json.load(f)["log_history"] if "loss" in e]
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(e["loss"])) for e in logged)


# --- parity with TRL ---------------------------------------------------------------------------


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """The same noise on every weight of two copies of one model (by name, in name order)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            param.add_(torch.randn(param.shape, generator=g) * 0.02)


def trl_rows(images) -> list[dict]:
    ask = [("What color are the shapes?", "red", "blue square"), ("How many shapes are there?", "2", "3")]
    return [{"images": [image], "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
             "chosen": [{"role": "assistant", "content": [{"type": "text", "text": c}]}],
             "rejected": [{"role": "assistant", "content": [{"type": "text", "text": r}]}]}
            for image, (q, c, r) in zip(images, ask, strict=True)]


def test_the_dpo_loss_equals_trls_on_the_same_batch(released_vlm, demo_data, tmp_path):
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import DPOConfig, DPOTrainer

    folder = released_vlm("llava")
    images = [Image.open(os.path.join(demo_data["image_folder"], f"images/train-0000{i}.png")).convert("RGB")
              for i in range(2)]
    config = DPOConfig(output_dir=str(tmp_path / "trl"), beta=BETA, loss_type=["sigmoid", "sft"],
                       loss_weights=[1.0, SFT_WEIGHT], max_length=None, per_device_train_batch_size=2,
                       report_to="none", use_cpu=True, bf16=False)  # TRL's default bf16 would autocast its reference
    theirs = DPOTrainer(model=AutoModelForImageTextToText.from_pretrained(folder), args=config,
                        train_dataset=Dataset.from_list(trl_rows(images)), processing_class=AutoProcessor.from_pretrained(folder))
    batch = next(iter(theirs.get_train_dataloader()))  # on the CPU already
    perturb(theirs.model)  # the policy moves; TRL's reference stays the model as loaded
    trl_loss = theirs.compute_loss(theirs.model, dict(batch)).item()

    # Ours on the same tokens: the 2B rows, each pair's image once, the reference cached from step 0.
    model, _, _ = build("llava", None, released_vlm)
    ours = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "labels": batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX),
            "pair_vision": {"pixel_values": batch["pixel_values"][:2]}}  # TRL repeats each image per row
    reference = compute_reference_logps(model, [ours], lambda items: dict(items[0]), 1, torch.device("cpu"),
                                        contextlib.nullcontext)
    reference = torch.cat([reference[:, 0], reference[:, 1]])
    perturb(model.vlm)
    out = model(**ours, pairs=True)
    loss, _ = dpo_loss(out.logps, reference, out.tokens, BETA, SFT_WEIGHT)
    assert abs(loss.item() - trl_loss) < 1e-5
    assert abs(trl_loss - 0.6931) > 1e-3  # the policy really differs from the reference
    wrong, _ = dpo_loss(out.logps, reference.roll(1), out.tokens, BETA, SFT_WEIGHT)
    assert abs(wrong.item() - trl_loss) > 1e-4  # a wrong reference is seen


# --- the memory plan ---------------------------------------------------------------------------


def test_dry_run_plans_the_dpo_stage(tiny_base, tmp_path, capsys):
    common = ["configs/demo.yaml", "--vision_model", tiny_base["vision"], "--llm_model", tiny_base["llm"],
              "--dry_run", "true", "--per_device_train_batch_size", "4", "--report_to", "none"]
    train.main([*common, "--output_dir", str(tmp_path / "sft")])
    train.main([*common, "--stage", "dpo", "--output_dir", str(tmp_path / "dpo")])
    sft, dpo = ((tmp_path / run / "memory_plan.txt").read_text() for run in ("sft", "dpo"))
    assert "batch 4 x" in sft and "batch 8 x" in dpo and "--stage dpo" in dpo
    assert "--stage dpo" not in sft



# --- it learns ---------------------------------------------------------------------------------


def held_out_accuracy(out) -> float:
    with open(os.path.join(out, "eval_predictions.jsonl")) as f:
        return accuracy([json.loads(line) for line in f])


@pytest.mark.slow
def test_dpo_after_a_brief_sft_raises_held_out_accuracy(tiny_base, tmp_path_factory):
    """A brief SFT leaves the tiny model at part of the colour questions; DPO on pairs of the same
    training images (the right colour chosen, a wrong one rejected) answers more held-out ones."""
    root = tmp_path_factory.mktemp("learns")
    data = make_color_set(str(root / "colors"), train_size=256, eval_size=64)
    data["pairs"] = write_pairs(data["train"], str(root / "pairs.json"))  # a wrong colour rejected
    common = ["configs/demo.yaml", "--vision_model", tiny_base["vision"], "--llm_model", tiny_base["llm"],
              "--image_folder", data["image_folder"], "--eval_data_path", data["eval"], "--warmup_steps", "0",
              "--per_device_train_batch_size", "16", "--logging_steps", "4", "--disable_tqdm", "true"]
    train.main([*common, "--data_path", data["train"], "--output_dir", str(root / "sft"), "--max_steps", "12"])
    train.main([*common, "--stage", "dpo", "--data_path", data["pairs"], "--init_from", str(root / "sft"),
                "--output_dir", str(root / "dpo"), "--max_steps", "24", "--learning_rate", "1e-4", "--dpo_beta", "0.1"])
    before, after = held_out_accuracy(root / "sft"), held_out_accuracy(root / "dpo")
    assert 0.3 < before < 0.9  # partly learnt: room to improve either way
    assert after > before, (before, after)
    with open(root / "dpo" / "trainer_state.json") as f:
        logged = [e for e in json.load(f)["log_history"] if "rewards/accuracies" in e]
    assert logged[-1]["rewards/accuracies"] >= 0.9
    assert logged[-1]["rewards/margins"] > logged[0]["rewards/margins"]


# --- the web page, the launch script ------------------------------------------------------------


def test_the_web_page_plots_the_rewards_beside_the_loss():
    from scripts.web_demo_panel import loss_history, reward_history

    state = {"log_history": [{"step": s, "loss": 0.7 - 0.1 * s, "rewards/chosen": 0.1 * s, "rewards/rejected": -0.1 * s,
                              "rewards/margins": 0.2 * s, "rewards/accuracies": 1.0} for s in (1, 2)]}
    rewards = reward_history(state)
    assert sorted(set(rewards["series"])) == ["chosen", "margins", "rejected"] and len(rewards) == 6
    assert rewards[rewards["series"] == "margins"]["reward"].tolist() == pytest.approx([0.2, 0.4])
    assert len(loss_history(state)) == 2
    assert reward_history({"log_history": [{"step": 1, "loss": 1.0}]}) is None  # an SFT run: no reward plot


@pytest.mark.slow
def test_the_minicpmv46_dpo_script_trains_two_steps(released_vlm, pairs, demo_data, tmp_path):
    """The recipe's script and config in step with train.py, on the tiny MiniCPM-V 4.6: its hub ids
    replaced (MODEL, DATA over its dataset_name), its SFT parent left out (--init_from is tested on
    the composed base above: a minicpmv4_6 stage costs a minute on this CPU)."""
    out = str(tmp_path / "dpo")
    env = {**SUBPROCESS_ENV, "NPROC": "1", "MODEL": released_vlm("minicpmv4_6"), "DATA": pairs,
           "IMAGES": demo_data["image_folder"], "OUT": out}
    result = subprocess.run(["bash", os.path.join(REPO_ROOT, "scripts", "minicpmv46_dpo.sh"), *CPU_ARGS,
                             "--init_from", ""], capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    assert "'rewards/accuracies'" in result.stdout
    with open(os.path.join(out, "freeze_table.txt")) as f:
        table = {line.split()[0]: line.split()[1] for line in f.read().splitlines()[1:4]}
    assert (table["vision"], table["connector"], table["llm"]) == ("frozen", "frozen", "lora")
    assert os.path.isfile(os.path.join(out, MANIFEST)) and os.path.isfile(os.path.join(out, REFERENCE_FILE))


# --- DDP and ZeRO-2 -----------------------------------------------------------------------------

ENGINES = {"ddp": [], "zero2": ["--deepspeed", "configs/deepspeed/zero2.json"]}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("engine", [pytest.param("ddp"), pytest.param("zero2", marks=pytest.mark.deepspeed)])
def test_two_ranks_train_the_pairs_as_one_process(engine, tiny_base, demo_data, tmp_path):
    """A global batch of 4 pairs on 1 rank, and on 2 ranks of 2 (the reference computed by rank 0,
    read by rank 1): the same trained delta, the same logged DPO metrics."""
    if engine == "zero2":
        pytest.importorskip("deepspeed", reason="pip install -r requirements-deepspeed.txt (CI does)")
    # 12 pairs for the 3 steps of 4: no epoch's last, short batch (which accelerate evens out across
    # ranks by repeating pairs, where one process runs it short).
    pairs = write_pairs(demo_data["train"], str(tmp_path / "pairs.json"), limit=12)
    dpo = ["--stage", "dpo", "--data_path", pairs, "--freeze_vit", "true", "--learning_rate", "1e-2",
           "--logging_steps", "1"]
    torchrun_train(1, tiny_base, demo_data, tmp_path / "one", *dpo)
    torchrun_train(2, tiny_base, demo_data, tmp_path / engine, *dpo, *ENGINES[engine])
    one, two = load_file(tmp_path / "one" / DELTA), load_file(tmp_path / engine / DELTA)
    assert set(one) == set(two) and any(k.startswith("llm.") for k in one)
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-4, rtol=0, msg=name)
    logs = []
    for run_dir in ("one", engine):
        with open(tmp_path / run_dir / "trainer_state.json") as f:
            logs.append([e for e in json.load(f)["log_history"] if "loss" in e])
    assert len(logs[0]) == len(logs[1]) == 3
    for a, b in zip(*logs, strict=True):
        for key in ("loss", "rewards/margins", "rewards/accuracies"):
            assert b[key] == pytest.approx(a[key], abs=1e-4), key
