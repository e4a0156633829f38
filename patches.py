"""Every place this repo relies on a library's private internals, in one module.

Each entry names the upstream behaviour it works around and the pinned version it was written
against; tests/test_patches.py fails when that behaviour changes, so an upgrade breaks here, in a
test, and not silently in a run. Nothing outside this module (and `bench/patches.py`, the
benchmarks' own) touches a private name of transformers, peft, accelerate, torch, bitsandbytes, TRL
or datasets: tests/test_private_names.py reads every Python file of the repo to hold that.

1. `TrainerHooks`: transformers 5.23's Trainer has no public hook for what a delta checkpoint
   needs: the save (`_save`, which `save_model` calls with the engine's gathered state dict),
   marking a `checkpoint-N` complete before old ones are pruned (`_save_checkpoint`), resuming
   (`_load_from_checkpoint`) and a training sampler (`_get_train_sampler`).
2. `DeviceSetupHooks`, `settle_cpu_distributed_state`: accelerate 1.15 names no backend for
   DeepSpeed without a GPU (and then counts one process), and turns only GPU process groups into
   FSDP (else silently DDP); `TrainingArguments._setup_devices` is where its state is made.
3. `keep_4bit_layout`: bitsandbytes 0.50 repacks a 4-bit weight for AVX512-BF16 CPUs on its first
   eval-mode call, after which it has no backward.
4. `dataset_fingerprint`: datasets 5.2 exposes a dataset's content hash only as `_fingerprint`.
5. `processor_image_tokens`: transformers 5.23's processors state how many tokens an image of a
   given size expands into only as `_get_num_multimodal_tokens` (what serving engines read); the
   data check counts a released VLM's samples with it.
8. `attention_implementation`: transformers 5.23 keeps a config's attention kernel ("eager",
   "sdpa", ...) only as `config._attn_implementation`; the memory plan counts eager's scores.
9. `valid_dict_fields`, `parser_actions`: the `--help` table shows which settings take a JSON
   object (transformers 5.23 lists them only as `TrainingArguments._VALID_DICT_FIELDS`) and reads
   each option's spelling from argparse's `_actions` (HfArgumentParser's base has no public list).
"""

from __future__ import annotations

import argparse
import os
from functools import cached_property

import torch
from accelerate.utils import DistributedType
from torch import nn
from transformers import Trainer, TrainingArguments


class TrainerHooks(Trainer):
    """The Trainer's private methods this repo overrides, each sending to a public method of the
    subclass (`run.trainer.VLMTrainer`): `save_delta`, `checkpoint_saved`, `load_delta_from`,
    and the `train_sampler` attribute."""

    train_sampler = None

    def _get_train_sampler(self, train_dataset=None):
        return self.train_sampler if self.train_sampler is not None else super()._get_train_sampler(train_dataset)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # Under ZeRO-3 and FSDP, `save_model` gathers `state_dict` (full tensors) on every rank
        # before calling this; the model's own parameters are shards there.
        self.save_delta(output_dir or self.args.output_dir, state_dict)

    def _save_checkpoint(self, model, trial) -> None:
        # `_save_checkpoint` prunes old checkpoints (`save_total_limit`) before returning, so
        # before this one could be marked complete: a kill in between would leave none complete.
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.checkpoint_saved(os.path.join(self._get_output_dir(trial), f"checkpoint-{self.state.global_step}"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self.load_delta_from(resume_from_checkpoint, model or self.model)


class DeviceSetupHooks(TrainingArguments):
    """`TrainingArguments` whose device setup (a private cached property, the one place accelerate's
    state is made) ends with `settle_cpu_distributed_state`. The run's arguments subclass this."""

    @cached_property
    def _setup_devices(self) -> torch.device:
        device = TrainingArguments._setup_devices.func(self)
        settle_cpu_distributed_state(self)
        return device


def settle_cpu_distributed_state(args) -> None:
    """After `TrainingArguments._setup_devices`: make accelerate's state say what really runs."""
    state = args.distributed_state
    if args.deepspeed and state.backend is None and torch.distributed.is_initialized():
        # DeepSpeed without a GPU: DeepSpeed joins all ranks over gloo, but accelerate, which
        # names no backend on this path, then counts one process. Batch sizes, samplers and
        # "who saves" all read these, so take them from the process group DeepSpeed made.
        state.backend = torch.distributed.get_backend()
        state.num_processes = torch.distributed.get_world_size()
        state.process_index = torch.distributed.get_rank()
        state.local_process_index = int(os.environ.get("LOCAL_RANK", 0))
    if args.fsdp and state.distributed_type == DistributedType.MULTI_CPU:
        # FSDP without a GPU: accelerate turns only GPU-like process groups into FSDP and would
        # silently wrap the model in plain DDP instead. FSDP2 (`fully_shard`) itself runs over
        # gloo, so let accelerate take its FSDP path.
        state.distributed_type = DistributedType.MULTI_GPU


def keep_4bit_layout(module: nn.Module) -> None:
    """bitsandbytes (0.50) repacks a 4-bit weight in place, for a CPU with AVX512-BF16, the first
    time it runs in eval mode without grad (an evaluation, a generate). The repacked layer then
    multiplies through `gemv_4bit`, which has no backward: training after that silently drops
    every gradient through the frozen 4-bit weights (LoRA below it and the connector get wrong
    gradients) and the frozen weight's bytes and absmax (cast to bf16) have changed. Keep the
    training layout always."""
    import bitsandbytes as bnb

    for m in module.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


def dataset_fingerprint(dataset) -> str:
    """The content hash datasets keeps for a dataset (changes whenever its rows do)."""
    return dataset._fingerprint


def processor_image_tokens(processor, sizes: list[tuple[int, int]]) -> list[int] | None:
    """Tokens each image of `sizes` ((height, width), in order) expands into, as the processor
    counts them with its own settings (pixel budget, tiling); None where the processor does not
    say (SmolVLM's and MiniCPM-V 4.6's in transformers 5.23)."""
    count = getattr(processor, "_get_num_multimodal_tokens", None)
    if count is None or not sizes:
        return None
    counts = getattr(count(image_sizes=list(sizes)), "num_image_tokens", None)
    return list(counts) if counts is not None and len(counts) == len(sizes) else None


def valid_dict_fields() -> tuple[str, ...]:
    """The TrainingArguments settings that take a dict, given as JSON text or a JSON file's path
    (`--deepspeed`, `--fsdp_config`, ...): `__post_init__` parses exactly these."""
    return tuple(getattr(TrainingArguments, "_VALID_DICT_FIELDS", ()))


def parser_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every option an argparse parser (HfArgumentParser) accepts, in the order added."""
    return list(parser._actions)


def attention_implementation(config) -> str | None:
    """The attention kernel a transformers config asks for ("eager", "sdpa", ...); None if unset."""
    return getattr(config, "_attn_implementation", None)
