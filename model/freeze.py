"""The freeze policy: one function decides which parameters train and returns the table it logs."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

COMPONENTS = ("vision", "connector", "llm")


@dataclass
class ComponentRow:
    component: str
    mode: str  # frozen | full | partial | lora | qlora (+full when LoRA and base weights train)
    total: int
    trainable: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)


def is_lora(name: str) -> bool:
    return "lora_" in name


def logical_numel(param: torch.Tensor) -> int:
    """Parameter count as the model sees it: a 4-bit weight packs two values per byte, and a
    ZeRO-3 parameter is an empty shard whose full size DeepSpeed keeps in `ds_numel`."""
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None:
        return quant_state.shape.numel()
    return getattr(param, "ds_numel", param.numel())


def is_quantized(param: torch.Tensor) -> bool:
    return not param.dtype.is_floating_point


def _flag_says_trainable(name: str, args) -> bool:
    component = name.split(".", 1)[0]
    if is_lora(name):
        return not args.freeze_lora
    return {
        "vision": not args.freeze_vit,
        "connector": not args.freeze_qformer,
        "llm": not args.freeze_llm,
    }[component]


def apply_freeze_policy(model, args) -> list[ComponentRow]:
    """Set `requires_grad` on every parameter from the flags, then the regex lists.

    Order: component flags (`freeze_vit`, `freeze_qformer`, `freeze_llm`; LoRA adapters follow
    `freeze_lora`), then `trainable_regex` turns matches on, then `frozen_regex` turns matches
    off. PEFT's own freezing is overridden here on purpose: wrapping the LLM in LoRA never
    freezes the connector. Trainable weights are kept in fp32 (the optimizer's master copy)
    even when the base loaded in bf16.
    """
    trainable_patterns = [re.compile(p) for p in args.trainable_regex or []]
    frozen_patterns = [re.compile(p) for p in args.frozen_regex or []]
    for name, param in model.named_parameters():
        wants = _flag_says_trainable(name, args)
        if any(p.search(name) for p in trainable_patterns):
            wants = True
        if any(p.search(name) for p in frozen_patterns):
            wants = False
        if is_quantized(param):
            if wants:
                raise ValueError(f"{name} is quantized ({param.dtype}) and cannot train; use --bits 16.")
            continue
        param.requires_grad_(wants)
        if wants and param.dtype != torch.float32:
            param.data = param.data.float()
    return freeze_table(model)


def freeze_table(model) -> list[ComponentRow]:
    rows = []
    for component in COMPONENTS:
        params = [(n, p) for n, p in model.named_parameters() if n.split(".", 1)[0] == component]
        total = sum(logical_numel(p) for _, p in params)  # adapters included
        trainable = sum(logical_numel(p) for n, p in params if p.requires_grad)
        lora_trains = any(p.requires_grad for n, p in params if is_lora(n))
        base_trains = any(p.requires_grad for n, p in params if not is_lora(n))
        if lora_trains:
            quantized = any(is_quantized(p) for _, p in params)
            mode = ("qlora" if quantized else "lora") + ("+full" if base_trains else "")
        elif not base_trains:
            mode = "frozen"
        elif trainable == total:
            mode = "full"
        else:
            mode = "partial"
        rows.append(ComponentRow(component, mode, total, trainable))
    return rows


def format_table(rows: list[ComponentRow]) -> str:
    lines = [f"{'component':<10} {'mode':<11} {'total':>14} {'trainable':>14} {'%':>7}"]
    for r in rows:
        lines.append(f"{r.component:<10} {r.mode:<11} {r.total:>14,} {r.trainable:>14,} {r.percent:>6.2f}%")
    total = sum(r.total for r in rows)
    trainable = sum(r.trainable for r in rows)
    lines.append(f"{'all':<10} {'':<11} {total:>14,} {trainable:>14,} {100 * trainable / total:>6.2f}%")
    return "\n".join(lines)
