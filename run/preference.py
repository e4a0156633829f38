"""`--stage dpo`: the pairs, the reference log-probs computed once at step 0, and the Trainer's loss.

The reference is the model as train.py built it before the first step: the base plus any
`--init_from` delta, the freeze policy applied, LoRA adapters at their start (zero for new
ones). Its log-probs for every pair are computed in one pass over the data before training and
kept with it (`PairDataset.reference`, and OUTPUT_DIR/reference_logps.safetensors keyed by the
pairs and the model, so that a resumed or relaunched run reads them instead of recomputing from
weights that have moved): no second model is held, for full fine-tuning as for LoRA.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import defaultdict

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from data.preference import pair_files, refuse_bad_pairs
from data.preference_batch import PairDataset
from model.preference import dpo_loss
from run.trainer import VLMTrainer

REFERENCE_FILE = "reference_logps.safetensors"
DPO_PLAN_NOTE = ("--stage dpo: the batch is 2 rows per pair (chosen, rejected); the tower runs once per pair, so "
                 "its share here is an upper bound; the reference holds no weights (its log-probs are cached, "
                 "8 bytes a pair)")


def preference_data(inputs, data_args, train_args):
    """(PairDataset, pair collator) of `--data_path`'s preference records. Pairs are checked as
    supervised records are, both continuations (data/preference.py), on rank 0 first; a pair
    with a bad chosen or rejected conversation is left out whole, under --skip_bad_samples."""
    out = os.path.join(train_args.output_dir, "pairs")
    saves = train_args.should_save
    with train_args.main_process_first(desc="preference pairs"):
        files = pair_files(data_args.data_path, out, write=saves)
        refuse_bad_pairs(files, data_args.data_path, data_args.skip_bad_samples, train_args.output_dir if saves else None)
        passes = {}
        for half in ("chosen", "rejected"):
            half_args = dataclasses.replace(data_args, data_path=getattr(files, half))
            passes[half] = (half_args, *inputs.checked_pass(half_args, os.path.join(out, half) if saves else None))
    # A pair is left out whole when either conversation is: both halves keep the same records.
    skip = set().union(*(half_skip for _, _, half_skip in passes.values()))
    halves = [inputs.samples(prepared, half_args, skip) for half_args, prepared, _ in passes.values()]
    dataset = PairDataset(*halves)
    dataset.chosen_path, dataset.rejected_path = files.chosen, files.rejected  # what the reference is keyed by
    return dataset, inputs.pair_collator(data_args.max_length)


def reference_key(model, dataset_files: tuple[str, str], skipped: int, init_from: str | None) -> str:
    """What the reference log-probs depend on: the pairs (both files' bytes), the model's
    settings and base fingerprint, and the stage it starts from."""
    digest = hashlib.sha256()
    for path in dataset_files:
        with open(path, "rb") as f:
            digest.update(f.read())
    settings = {"model": dataclasses.asdict(model.build_args), "fingerprint": model.base_fingerprint,
                "init_from": os.path.abspath(init_from) if init_from else None, "pairs_left": skipped}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()


@torch.no_grad()
def compute_reference_logps(model, dataset: PairDataset, collator, batch_size: int, device, autocast) -> torch.Tensor:
    """[pairs, 2] (chosen, rejected) summed log-probs of every pair's answers under `model` as it
    is, in eval mode (no dropout: the reference is one function), one batch at a time."""
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collator, shuffle=False)
    rows = []
    try:
        for batch in loader:
            batch = {k: _to(v, device) for k, v in batch.items()}
            with autocast():  # the training steps' mixed precision
                logps = model(**batch, pairs=True).logps.float()  # [2B]
            rows.append(torch.stack(logps.chunk(2), dim=1).cpu())  # [B, 2]
    finally:
        model.train(was_training)
    return torch.cat(rows)


def _to(value, device):
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value.to(device) if isinstance(value, torch.Tensor) else value


class PreferenceTrainer(VLMTrainer):
    """VLMTrainer with DPO's loss: each batch's policy log-probs (the tower and connector once
    per pair) against the cached reference; `rewards/chosen`, `rewards/rejected`,
    `rewards/margins`, `rewards/accuracies`, `logps/chosen`, `logps/rejected` logged beside the
    loss (every `report_to` logger, trainer_state.json, the web page)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The loss is a mean over pairs, not a sum over tokens: the Trainer divides it by the
        # accumulation steps, and DDP averages the ranks' gradients.
        self.model_accepts_loss_kwargs = False
        self.pair_metrics: dict[str, list[float]] = defaultdict(list)
        self.train_dataset.reference = self.cached_reference_logps()

    def cached_reference_logps(self) -> torch.Tensor:
        """The reference log-probs: OUTPUT_DIR's cache where it is for these pairs and this model,
        else computed now (rank 0 first; the others then read its file)."""
        dataset, model = self.train_dataset, self.model
        path = os.path.join(self.args.output_dir, REFERENCE_FILE)
        files = (dataset.chosen_path, dataset.rejected_path)
        key = reference_key(model, files, len(dataset), self.args.init_from)
        with self.args.main_process_first(desc="reference log-probs"):
            cached = _read_reference(path, key)
            if cached is not None and len(cached) == len(dataset):
                return cached
            if model.build_args.bits == 16:
                model.to(self.args.device)  # where training runs (DeepSpeed places it later)
            device = next(model.parameters()).device
            reference = compute_reference_logps(model, dataset, self.data_collator, self.args.per_device_train_batch_size,
                                                device, self.accelerator.autocast)
            if self.args.should_save:
                os.makedirs(self.args.output_dir, exist_ok=True)
                save_file({"logps": reference}, path, metadata={"key": key})
            return reference

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        reference = inputs.pop("reference_logps")  # [2B]
        out = model(**inputs, pairs=True)
        loss, metrics = dpo_loss(out.logps, reference, out.tokens, self.args.dpo_beta, self.args.dpo_sft_weight)
        means = self.accelerator.gather(torch.stack([m.mean() for m in metrics.values()])[None])  # [ranks, k]
        for name, value in zip(metrics, means.mean(dim=0).tolist(), strict=True):
            self.pair_metrics[name].append(value)
        return (loss, out) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The pair metrics, averaged over the steps since the last log, beside the loss."""
        if "loss" in logs and self.pair_metrics:
            logs = {**logs, **{name: sum(v) / len(v) for name, v in self.pair_metrics.items()}}
            self.pair_metrics.clear()
        super().log(logs, start_time)


def _read_reference(path: str, key: str) -> torch.Tensor | None:
    if not os.path.isfile(path):
        return None
    with safe_open(path, "pt") as f:
        if (f.metadata() or {}).get("key") != key:
            return None
        return f.get_tensor("logps")
