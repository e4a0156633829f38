"""transformers' Trainer, changed only where a VLM with a delta checkpoint needs it."""

from __future__ import annotations

import os

import torch

from patches import TrainerHooks
from run.checkpoint import load_delta, save_checkpoint
from run.run_folder import mark_complete, prune_checkpoints


class VLMTrainer(TrainerHooks):
    """Five changes: the optimizer gets a learning rate per component and only trainable
    parameters; saving writes the delta checkpoint (`Trainer.save_model` on a plain module
    would write frozen base, LoRA and quantization state together); a `checkpoint-N` counts
    only once all of it is written; resuming loads the delta back; a training sampler may be
    handed in (the modality-grouped one lives in data/, which model/ does not import)."""

    def __init__(self, *args, parent_checkpoint: str | None = None, train_sampler=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.parent_checkpoint = parent_checkpoint
        self.train_sampler = train_sampler

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
