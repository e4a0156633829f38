"""transformers' Trainer, changed only where a VLM with a delta checkpoint needs it."""

from __future__ import annotations

import os
import time

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import IntervalStrategy, speed_metrics

from patches import TrainerHooks
from run.checkpoint import load_delta, save_checkpoint
from run.predict import HeldOut, accuracy
from run.run_folder import mark_complete, prune_checkpoints


class LogLastStep(TrainerCallback):
    """The last step logs its loss whatever `logging_steps` says: a run shorter than it (a
    recipe's 10 steps, a 3-step try) would otherwise leave trainer_state.json without any loss,
    and the web page, wandb and tensorboard without a curve."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps and args.logging_strategy != IntervalStrategy.NO:
            control.should_log = True  # the Trainer logs once per step, even if this was due anyway
        return control


def answer_held_out(held_out: HeldOut, model) -> list[dict]:
    """Every record's result, on every rank: each rank answers every world_size-th record, then
    all gather (a collective: every rank calls it). Ranks from the process group itself, which
    is what the gather runs on."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return held_out.predict(model)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    shares: list = [None] * world
    torch.distributed.all_gather_object(shares, held_out.predict(model, rank, world))
    return [result for share in shares for result in share]


def disable_kv_cache(model: torch.nn.Module) -> None:
    """No KV cache in training forwards, in every config of the model. transformers' Trainer sets
    `model.config.use_cache = args.use_cache` (False) on the top module alone: our models keep
    the transformers model one level down, and a composite config (Qwen2.5-VL's) keeps the LLM's
    `use_cache` in its text config, which the LLM reads. Left True, every training forward
    builds a DynamicCache: a copy of every layer's keys and values, held until the forward ends.
    `generate` passes its own `use_cache` (the generation config's), so evaluation still caches."""
    for module in model.modules():
        config = getattr(module, "config", None)  # an LLM's own module holds its text config
        if getattr(config, "use_cache", None):
            config.use_cache = False


class EpochOfSampler(TrainerCallback):
    """Tells a sampler with `set_epoch` (the packed one) which epoch begins. transformers' own call
    does not reach it through accelerate's wrappers when a multi-rank run resumes mid-epoch
    (`SkipBatchSampler` around `BatchSamplerShard`), and the resumed epoch would replay epoch 0."""

    def __init__(self, sampler):
        self.sampler = sampler

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.sampler.set_epoch(int(state.epoch or 0))  # a resumed run's state.epoch: epoch + its fraction done


class VLMTrainer(TrainerHooks):
    """Six changes: the optimizer gets a learning rate per component and only trainable
    parameters; saving writes the delta checkpoint (`Trainer.save_model` on a plain module
    would write frozen base, LoRA and quantization state together); a `checkpoint-N` counts
    only once all of it is written; resuming loads the delta back; a training sampler may be
    handed in (the modality-grouped one lives in data/, which model/ does not import);
    evaluation is generation exact-match accuracy on a `HeldOut` sample (the `eval_dataset`),
    as infer.py answers, not a loss. And the last step always logs its loss (`LogLastStep`).
    Training forwards build no KV cache (`disable_kv_cache`)."""

    def __init__(self, *args, parent_checkpoint: str | None = None, train_sampler=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.parent_checkpoint = parent_checkpoint
        self.train_sampler = train_sampler
        self.add_callback(LogLastStep)
        if hasattr(train_sampler, "set_epoch"):
            self.add_callback(EpochOfSampler(train_sampler))
        if not self.args.use_cache:
            disable_kv_cache(self.model)

    def evaluate(self, eval_dataset: HeldOut | None = None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """`{prefix}_accuracy` (exact match of the greedy answer to each record's first question),
        logged like the loss: to every `report_to` logger and into trainer_state.json. The
        Trainer calls it on every rank every `eval_steps`; each rank answers its share of the
        sample (a DDP or ZeRO-1/2 rank holds the whole model), so no rank idles in a collective
        while another generates, and all return the same metrics. Sharded weights (ZeRO-3, FSDP)
        are refused before training (config.check_evaluation): one rank cannot run them alone."""
        held_out = eval_dataset if eval_dataset is not None else self.eval_dataset
        start = time.time()
        model = self.model  # the module itself, not the DDP / DeepSpeed wrapper
        was_training = model.training
        model.eval()  # no dropout, and no activation checkpointing in generate
        try:
            results = answer_held_out(held_out, model)
        finally:
            model.train(was_training)
        metrics = {
            f"{metric_key_prefix}_accuracy": accuracy(results),
            f"{metric_key_prefix}_samples": len(results),
            **speed_metrics(metric_key_prefix, start, num_samples=len(results)),
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        model = model or self.model
        decay = set(self.get_decay_parameter_names(model))
        rates = {
            "vision": self.args.vision_lr or self.args.learning_rate,
            "connector": self.args.connector_lr or self.args.learning_rate,
            "llm": self.args.learning_rate,
        }
        groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                groups.setdefault((model.component(name), name in decay), []).append(param)
        param_groups = [
            {
                "params": params,
                "lr": rates[component],
                "weight_decay": self.args.weight_decay if decays else 0.0,
            }
            for (component, decays), params in groups.items()
        ]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    # The Trainer's private hooks (patches.TrainerHooks) call these three.
    def save_delta(self, output_dir: str, state_dict=None) -> None:
        """The delta checkpoint; `state_dict`: full tensors a sharded engine gathered."""
        if self.args.should_save:
            save_checkpoint(
                self.accelerator.unwrap_model(self.model),
                output_dir,
                tokenizer=self.processing_class,
                parent=self.parent_checkpoint,
                state_dict=state_dict,
                seed=self.args.seed,
            )
            print(f"[rank {self.args.process_index}] saved delta checkpoint to {output_dir}")

    def checkpoint_saved(self, ckpt_dir: str) -> None:
        """All of `checkpoint-N` is written: mark it complete, then prune (never the reverse)."""
        if self.args.should_save:
            mark_complete(ckpt_dir)
            prune_checkpoints(os.path.dirname(ckpt_dir), self.args.save_total_limit)

    def load_delta_from(self, ckpt_dir: str, model) -> None:
        # The one loader: a checkpoint-N from a run on another base is refused here too.
        load_delta(model, ckpt_dir)
