"""transformers' Trainer, changed only where a VLM with a delta checkpoint needs it."""

from __future__ import annotations

import os

import torch
from transformers import Trainer

from run.checkpoint import load_delta, save_checkpoint
from run.run_folder import mark_complete, prune_checkpoints


class VLMTrainer(Trainer):
    """Five changes: the optimizer gets a learning rate per component and only trainable
    parameters; saving writes the delta checkpoint (`Trainer.save_model` on a plain module
    would write frozen base, LoRA and quantization state together); a `checkpoint-N` counts
    only once all of it is written; resuming loads the delta back; a training sampler may be
    handed in (the modality-grouped one lives in data/, which model/ does not import)."""

    def __init__(self, *args, parent_checkpoint: str | None = None, train_sampler=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.parent_checkpoint = parent_checkpoint
        self.train_sampler = train_sampler

    def _get_train_sampler(self, train_dataset=None):
        if self.train_sampler is not None:
            return self.train_sampler
        return super()._get_train_sampler(train_dataset)

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

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # Under ZeRO-3 and FSDP the Trainer gathers `state_dict` (full tensors) on every rank
        # before calling this; the model's own parameters are shards there.
        if self.args.should_save:
            output_dir = output_dir or self.args.output_dir
            save_checkpoint(
                self.accelerator.unwrap_model(self.model),
                output_dir,
                tokenizer=self.processing_class,
                parent=self.parent_checkpoint,
                state_dict=state_dict,
            )
            print(f"[rank {self.args.process_index}] saved delta checkpoint to {output_dir}")

    def _save_checkpoint(self, model, trial) -> None:
        # The Trainer prunes old checkpoints before we could mark this one complete; a kill in
        # between would leave no good checkpoint at save_total_limit 1. So: save, mark, prune.
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save:
            run_dir = self._get_output_dir(trial)
            mark_complete(os.path.join(run_dir, f"checkpoint-{self.state.global_step}"))
            prune_checkpoints(run_dir, limit)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # The one loader: a checkpoint-N from a run on another base is refused here too.
        load_delta(model or self.model, resume_from_checkpoint)
