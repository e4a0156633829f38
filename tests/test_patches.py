"""patches.py is the one place this repo relies on libraries' private internals. Each test pins
the upstream behaviour a patch depends on: an upgrade that changes it fails here, by name, instead
of silently in a run (a delta never saved, a FSDP run that is really DDP, a 4-bit LoRA without
gradients)."""

from __future__ import annotations

import inspect
import os
import re
from functools import cached_property

import bitsandbytes as bnb
import datasets
import torch
from accelerate import PartialState
from transformers import Trainer, TrainingArguments

import patches


def test_trainer_hooks_override_what_the_trainer_still_calls():
    # save_model hands the engine's gathered state dict to _save (ZeRO-3, FSDP).
    assert "self._save(" in inspect.getsource(Trainer.save_model)
    # _save_checkpoint saves the model through save_model, then prunes by save_total_limit.
    source = inspect.getsource(Trainer._save_checkpoint)
    assert source.index("self.save_model(") < source.index("save_total_limit=self.args.save_total_limit")
    assert list(inspect.signature(Trainer._load_from_checkpoint).parameters) == ["self", "resume_from_checkpoint", "model"]
    assert "self._load_from_checkpoint(" in inspect.getsource(Trainer.train) + inspect.getsource(Trainer._inner_training_loop)
    assert list(inspect.signature(Trainer._get_train_sampler).parameters) == ["self", "train_dataset"]
    assert list(inspect.signature(Trainer._get_output_dir).parameters) == ["self", "trial"]
    for name in ("_save", "_save_checkpoint", "_load_from_checkpoint", "_get_train_sampler"):
        assert name in patches.TrainerHooks.__dict__


def test_setup_devices_is_a_cached_property_and_the_state_fields_exist():
    assert isinstance(inspect.getattr_static(TrainingArguments, "_setup_devices"), cached_property)
    state = PartialState()
    for field in ("backend", "num_processes", "process_index", "local_process_index", "distributed_type"):
        assert hasattr(state, field), field


def test_bitsandbytes_4bit_layer_has_the_repacking_switch():
    layer = bnb.nn.Linear4bit(8, 8)
    assert hasattr(layer, "support_avx512bf16_for_cpu")  # the switch keep_4bit_layout turns off
    patches.keep_4bit_layout(torch.nn.Sequential(layer))
    assert layer.support_avx512bf16_for_cpu is False


def test_dataset_fingerprint_follows_its_rows():
    one = datasets.Dataset.from_dict({"a": [1, 2]})
    other = one.map(lambda row: {"a": row["a"] + 1})
    assert patches.dataset_fingerprint(one) == patches.dataset_fingerprint(datasets.Dataset.from_dict({"a": [1, 2]}))
    assert patches.dataset_fingerprint(one) != patches.dataset_fingerprint(other)


def test_nothing_else_touches_a_private_name_of_these_libraries():
    """A private attribute of transformers, accelerate, bitsandbytes, TRL or datasets used outside
    patches.py is a patch hiding elsewhere."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    private = re.compile(
        r"\b(_setup_devices|_save_checkpoint|_load_from_checkpoint|_get_train_sampler"
        r"|support_avx512bf16_for_cpu|_CHUNKED_LOGPROB_CHUNK_SIZE|_use_triton|_adjust|_fingerprint)\b"
    )
    offenders = []
    for folder, _, files in os.walk(root):
        if any(part in folder for part in (".git", "tests", "__pycache__")):
            continue
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and os.path.basename(path) != "patches.py":
                with open(path) as f:
                    offenders += [f"{path}:{i}" for i, line in enumerate(f, 1) if private.search(line)]
    # config.py overrides the cached property by its name, and sends its body here.
    assert [o for o in offenders if not o.startswith(os.path.join(root, "config.py"))] == []
