"""patches.py is the one place this repo relies on libraries' private internals. Each test pins
the upstream behaviour a patch depends on: an upgrade that changes it fails here, by name, instead
of silently in a run (a delta never saved, a FSDP run that is really DDP, a 4-bit LoRA without
gradients)."""

from __future__ import annotations

import dataclasses
import inspect
from functools import cached_property

import bitsandbytes as bnb
import datasets
import torch
from accelerate import PartialState
from transformers import HfArgumentParser, LlamaConfig, Trainer, TrainingArguments

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
    # The device property is what makes accelerate's state: DeviceSetupHooks settles it there.
    assert isinstance(inspect.getattr_static(patches.DeviceSetupHooks, "_setup_devices"), cached_property)
    assert "settle_cpu_distributed_state(self)" in inspect.getsource(patches.DeviceSetupHooks)
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


def test_the_json_settings_are_the_ones_training_arguments_parses():
    fields = patches.valid_dict_fields()
    assert {"deepspeed", "fsdp_config", "accelerator_config"} <= set(fields)
    assert set(fields) <= {f.name for f in dataclasses.fields(TrainingArguments)}
    # __post_init__ turns the JSON text of exactly these fields into dicts.
    assert "self._VALID_DICT_FIELDS" in inspect.getsource(TrainingArguments.__post_init__)
    args = TrainingArguments(output_dir="unused", report_to="none", lr_scheduler_kwargs='{"power": 2.0}')
    assert "lr_scheduler_kwargs" in fields and args.lr_scheduler_kwargs == {"power": 2.0}


def test_parser_actions_list_every_option_of_an_hf_argument_parser():
    @dataclasses.dataclass
    class Settings:
        width: int = 4
        name: str = "x"

    options = [a.option_strings[0] for a in patches.parser_actions(HfArgumentParser(Settings))]
    assert options == ["-h", "--width", "--name"]


def test_attention_implementation_is_what_the_config_was_built_with():
    assert patches.attention_implementation(LlamaConfig(attn_implementation="eager")) == "eager"
    assert patches.attention_implementation(LlamaConfig(attn_implementation="sdpa")) == "sdpa"
