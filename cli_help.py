"""`--help`: the pipeline's settings first, grouped, each with its default and one line.

`cli.parse_config` prints `format_help(config.ALL_ARGUMENTS)` on `-h`/`--help`, and every setting
with `--help_all`. Imports transformers only when called: `python cli.py torchrun` needs none of it.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys

HELP_ALL = "--help_all"


def prog() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name.endswith(".py") else "train.py"


# Settings whose field carries no help text: their one line in --help.
_FALLBACK_HELP = {
    "vision_feature_layer": "Hidden layer of the tower the connector reads (LLaVA: -2, the second to last).",
    "resampler_num_heads": "Attention heads of the resampler.",
    "lora_enable": "Add LoRA adapters to --lora_target.",
    "lora_r": "LoRA rank.",
    "lora_alpha": "LoRA scale numerator (the update is scaled by alpha / r).",
    "lora_dropout": "Dropout on each adapter's input; 0 saves the masked copy's memory.",
    "double_quant": "4-bit: quantize the quantization constants too.",
    "output_dir": "Where the checkpoint, config.yaml and the freeze table go.",
    "remove_unused_columns": "Kept false: the collator's keys are the model's inputs (pixel_values included).",
    "ddp_find_unused_parameters": "Kept false: every trainable parameter gets a gradient on every rank.",
}
# transformers' settings most runs set, listed in --help after the pipeline's own; --help_all has all.
COMMON_TRAINER_SETTINGS = (
    "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "bf16",
    "activation_checkpointing", "logging_steps", "save_strategy", "save_steps", "save_total_limit",
    "resume_from_checkpoint", "report_to", "dataloader_num_workers", "deepspeed", "seed",
)
_FREEZE_AND_LORA = ("freeze_", "lora_")
_FREEZE_AND_LORA_NAMES = {"trainable_regex", "frozen_regex", "bits", "quant_type", "double_quant"}


def help_groups(arguments, everything: bool = False) -> list[tuple[str, list[str]]]:
    """(title, setting names) in the order --help prints them; `arguments`: config.ALL_ARGUMENTS."""
    from transformers import TrainingArguments  # here: `python cli.py torchrun` needs none of it

    ModelArguments, DataArguments, TrainArguments = arguments
    own_train = list(inspect.get_annotations(TrainArguments))  # declared here, not inherited
    model = [f.name for f in dataclasses.fields(ModelArguments) if f.init]
    freeze = [n for n in model if n.startswith(_FREEZE_AND_LORA) or n in _FREEZE_AND_LORA_NAMES]
    groups = [
        ("model", [n for n in model if n not in freeze]),
        ("freeze and LoRA", freeze),
        ("data", [f.name for f in dataclasses.fields(DataArguments) if f.init]),
        ("run", own_train),
    ]
    shown = {n for _, names in groups for n in names}
    trainer = [f.name for f in dataclasses.fields(TrainingArguments) if f.init and f.name not in shown]
    if everything:
        groups.append(("transformers TrainingArguments (all)", trainer))
    else:
        groups.append(("transformers TrainingArguments (most used)", [n for n in COMMON_TRAINER_SETTINGS if n in trainer]))
    return groups


def _show(value) -> str:
    if value is None or value == [] or value == "":
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return " ".join(map(_show, value))
    return str(getattr(value, "value", value))


def _one_line(text: str) -> str:
    """The first sentence of a help text, on one line."""
    text = " ".join(text.split())
    for stop in (". ", ".) "):
        if stop in text:
            text = text[: text.index(stop) + len(stop) - 1]
            break
    return text


def format_help(arguments, everything: bool = False) -> str:
    """The project's settings, grouped, one line each: `--name VALUE  (default X)  what it does`.
    Every spelling shown is one the parser accepts (underscores; booleans take true|false)."""
    from transformers import HfArgumentParser  # as in help_groups

    import patches

    parser = HfArgumentParser(arguments, allow_abbrev=False)
    actions = {a.option_strings[0][2:]: a for a in patches.parser_actions(parser) if a.option_strings[:1] != ["-h"]}
    fields = {f.name: f for cls in arguments for f in dataclasses.fields(cls)}
    program = prog()
    rows: list[tuple[str, list[tuple[str, str]]]] = []
    for title, names in help_groups(arguments, everything):
        lines = []
        for name in names:
            action, f = actions.get(name), fields[name]
            if action is None:
                continue
            if action.type is not None and getattr(action.type, "__name__", "") == "string_to_bool":
                value = "true|false"
            elif name in patches.valid_dict_fields():
                value = "JSON|PATH"  # a JSON object, or a file holding one
            elif action.choices and len(action.choices) <= 6:
                value = "|".join(map(str, action.choices))
            elif action.type is int:
                value = "N"
            elif action.type is float:
                value = "X"
            else:
                value = "TEXT"
            if action.nargs == "+":
                value += f" [{value} ...]"
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            help_text = _one_line(f.metadata.get("help") or _FALLBACK_HELP.get(name, ""))
            lines.append((f"--{name} {value}", f"(default {_show(default)})  {help_text}".rstrip()))
        rows.append((title, lines))
    width = min(max(len(left) for _, lines in rows for left, _ in lines), 44)
    out = [
        f"usage: python {program} [CONFIG.yaml] [--setting value ...]",
        f"       torchrun --nproc_per_node=N {program} [CONFIG.yaml] [--setting value ...]",
        "",
        "With no arguments, the built-in demo (configs/demo.yaml). A YAML file's settings come first and",
        "the command line wins. Booleans take true or false. Defaults are the built-in ones, before any YAML.",
    ]
    for title, lines in rows:
        out += ["", f"{title}:"]
        out += [f"  {left.ljust(width)}  {right}" for left, right in lines]
    out.append("")
    if everything:
        out.append(f"These are all the settings; `python {program} --help` shows the pipeline's own with the most used.")
    else:
        out.append(f"Every transformers TrainingArguments setting is accepted too: `python {program} {HELP_ALL}` lists all.")
    return "\n".join(out)
