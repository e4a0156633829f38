"""The freeze policy: one function decides which parameters train and returns the table it logs."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from errors import UserError
from model.components import COMPONENTS, is_under, layer_index, top_module
from model.quantization import is_bitsandbytes_weight


class FreezeError(UserError):
    """A freeze setting that cannot mean what the user wants; the message names it and the fix."""


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
    return is_bitsandbytes_weight(param)


def _flag_says_trainable(component: str, name: str, args) -> bool:
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
    `freeze_lora`, and `lora_top_layers` keeps the LLM's lower adapters frozen), then
    `trainable_regex` turns matches on, then `frozen_regex` turns matches off; what the forward
    never reaches (`model.unused_modules`) stays frozen.
    PEFT's own freezing is overridden here on purpose: wrapping the LLM in LoRA never
    freezes the connector. Trainable weights are kept in fp32 (the optimizer's master copy)
    even when the base loaded in bf16.
    """
    refuse_unmapped(model)
    trainable_patterns = [re.compile(p) for p in args.trainable_regex or []]
    frozen_patterns = [re.compile(p) for p in args.frozen_regex or []]
    below = _lowest_trained_layer(model, args.lora_top_layers)
    for name, param in model.named_parameters():
        wants = _flag_says_trainable(model.component(name), name, args)
        if is_lora(name) and model.component(name) == "llm" and _layer_of(name) < below:
            wants = False
        if any(p.search(name) for p in trainable_patterns):
            wants = True
        if any(p.search(name) for p in frozen_patterns) or is_under(name, model.unused_modules):
            wants = False
        if is_quantized(param):
            if wants:
                raise ValueError(f"{name} is quantized ({param.dtype}) and cannot train; use --bits 16.")
            continue
        param.requires_grad_(wants)
        if wants and param.dtype != torch.float32:
            param.data = param.data.float()
    rows = freeze_table(model)
    refuse_silent_no_ops(rows, args)
    return rows


def _layer_of(name: str) -> int:
    """The decoder layer a parameter sits in (a large number outside any: never below)."""
    index = layer_index(name)
    return 1 << 30 if index is None else index


def _lowest_trained_layer(model, top_fraction: float | None) -> int:
    """`--lora_top_layers 0.5` on a 26-layer LLM: adapters of layers 13-25 train. From the model's
    own depth, so one recipe fits every size (a fixed layer regex froze all of a small model)."""
    if top_fraction is None:
        return 0
    depth = 1 + max((_layer_of(n) for n, _ in model.component_parameters("llm") if _layer_of(n) < 1 << 30), default=-1)
    return depth - max(1, round(depth * top_fraction))


def refuse_unmapped(model) -> None:
    """Every parameter belongs to a component, or the freeze flags would not say what it does."""
    unmapped = [n for n, _ in model.named_parameters() if model.component(n) is None]
    if unmapped:
        children = sorted({top_module(n) for n in unmapped})
        raise FreezeError(
            f"{len(unmapped)} parameters belong to no component (e.g. {unmapped[:3]}), under {children}. "
            "Map each module to one with --vision_modules, --connector_modules or --llm_modules "
            "(module names, e.g. --connector_modules mlp1); model/components.py lists the known ones."
        )


def _declared_modes(args) -> dict[str, list[str]]:
    """What the flags ask of each component: the modes (lora, full) that must leave it trainable."""
    lora = args.lora_enable and not args.freeze_lora
    return {
        "vision": (["lora"] if lora and args.lora_on_vit else []) + ([] if args.freeze_vit else ["full"]),
        "connector": [] if args.freeze_qformer else ["full"],
        "llm": (["lora"] if lora and args.lora_on_llm else []) + ([] if args.freeze_llm else ["full"]),
    }


def refuse_silent_no_ops(rows: list[ComponentRow], args) -> None:
    """A component the flags declare LoRA or full that ends with nothing trainable (a
    `frozen_regex` that matched all of it) trains nothing without a word: refused, naming it."""
    declared = _declared_modes(args)
    for row in rows:
        if declared[row.component] and row.total and not row.trainable:
            raise FreezeError(
                f"The flags train the {row.component} ({' + '.join(declared[row.component])}) but nothing "
                f"of it is left trainable: --frozen_regex {args.frozen_regex} matches every one of its "
                f"{row.total:,} parameters. Narrow the regex, or freeze the {row.component} by its flag."
            )


def freeze_table(model) -> list[ComponentRow]:
    rows = []
    for component in COMPONENTS:
        params = [(n, p) for n, p in model.named_parameters() if model.component(n) == component]
        total = sum(logical_numel(p) for _, p in params)  # adapters included
        trainable = sum(logical_numel(p) for n, p in params if p.requires_grad)
        lora_trains = any(p.requires_grad for n, p in params if is_lora(n))
        base_trains = any(p.requires_grad for n, p in params if not is_lora(n))
        if lora_trains:
            quantized = any(is_quantized(p) for _, p in params)
            mode = ("qlora" if quantized else "lora") + ("+full" if base_trains else "")
        elif not base_trains:
            mode = "frozen"
        elif trainable == sum(logical_numel(p) for n, p in params if not is_under(n, model.unused_modules)):
            mode = "full"  # all that the forward reaches (a tower's unused last layers stay frozen)
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
