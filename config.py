"""Every setting of the pipeline, in three typed dataclasses, parsed from YAML + command line.

    python train.py configs/lora.yaml --learning_rate 1e-4     # the command line wins

`ModelArguments` says what model is built (base ids, connector, LoRA, quantization) and which
parts train; it is stored in every checkpoint's manifest, so a checkpoint rebuilds its model.
`DataArguments` says what it reads. `TrainArguments` is transformers' `TrainingArguments`
plus the few knobs this pipeline adds.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import sys
from dataclasses import dataclass, field

import torch
import yaml
from transformers import HfArgumentParser
from transformers.trainer_utils import IntervalStrategy

from cli import format_help, prog
from model.connectors import CONNECTORS
from patches import DeviceSetupHooks
from run.environment import cap_dataloader_workers, check_logging

DEFAULT_VISION, DEFAULT_LLM = "openai/clip-vit-large-patch14-336", "lmsys/vicuna-7b-v1.5"  # LLaVA-1.5's
DEFAULT_EVAL_STEPS = 0.1  # a tenth of the run: generation costs far more than a logged loss
DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.yaml")


class ConfigError(ValueError):
    """A setting, or a combination of settings, that cannot work. The message names the fix."""


@dataclass
class ModelArguments:
    # --- what the model is built from: a released VLM, or a tower + a fresh connector + an LLM --
    vlm_model: str | None = field(
        default=None,
        metadata={"help": "A released VLM (any AutoModelForImageTextToText: llava-hf, Qwen2.5-VL, SmolVLM, "
                  "PaliGemma, MiniCPM-V 4.6, ...): hub id or local path. Replaces vision_model + llm_model."},
    )
    vlm_revision: str | None = field(default=None, metadata={"help": "Hub revision of vlm_model."})
    vision_model: str | None = field(
        default=None,
        metadata={"help": "Composed base: vision tower, hub id or local path (CLIP, SigLIP, ...); "
                  f"default {DEFAULT_VISION}."},
    )
    llm_model: str | None = field(
        default=None, metadata={"help": f"Composed base: causal LLM, hub id or local path; default {DEFAULT_LLM}."}
    )
    vision_revision: str | None = field(default=None, metadata={"help": "Hub revision."})
    llm_revision: str | None = field(default=None, metadata={"help": "Hub revision."})
    dtype: str = field(
        default="float32",
        metadata={"help": "Dtype the base weights load in: float32 | bfloat16 | float16."},
    )
    build_tiny_base_if_missing: bool = field(
        default=False,
        metadata={"help": "Demo only: write a seeded tiny base to the two paths above if absent."},
    )
    # LLaVA-1.5 takes the second-to-last layer's patch features and drops CLS.
    vision_feature_layer: int = field(default=-2)
    vision_feature_select_strategy: str = field(
        default="default",
        metadata={"help": "'default' drops the CLS token when the tower has one; 'full' keeps all."},
    )
    connector: str = field(
        default="mlp2x_gelu",
        metadata={"help": "Composed base: " + "; ".join(f"{name}: {cls.help}" for name, cls in CONNECTORS.items())},
    )
    resampler_num_queries: int = field(default=64, metadata={"help": "Image tokens per image."})
    resampler_num_heads: int = field(default=8)

    # --- what trains ---------------------------------------------------------------------------
    freeze_vit: bool = field(default=True, metadata={"help": "Freeze the vision tower's weights."})
    freeze_qformer: bool = field(default=False, metadata={"help": "Freeze the connector."})
    freeze_llm: bool = field(default=True, metadata={"help": "Freeze the LLM's weights."})
    lora_enable: bool = field(default=False)
    lora_target: str = field(default="llm", metadata={"help": "llm | vit | both"})
    lora_r: int = field(default=64)
    lora_alpha: int = field(default=16)
    lora_dropout: float = field(default=0.05)
    lora_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module names for LoRA; default: every linear layer of the target."},
    )
    freeze_lora: bool = field(
        default=False, metadata={"help": "Keep LoRA adapters in the graph but frozen."}
    )
    lora_top_layers: float | None = field(
        default=None,
        metadata={"help": "LoRA trains on this top fraction of the LLM's layers only (openpi: 0.5), "
                  "whatever the model's depth; the adapters below stay frozen."},
    )
    trainable_regex: list[str] | None = field(
        default=None, metadata={"help": "Parameter-name regexes forced trainable (after flags)."}
    )
    frozen_regex: list[str] | None = field(
        default=None, metadata={"help": "Parameter-name regexes forced frozen (applied last)."}
    )
    fused_loss: bool = field(
        default=True,
        metadata={"help": "Training steps run the LM head fused with the loss, a chunk of rows at a time "
                  "(model/loss.py), where the LLM's logits are its plain head's output; false: the LLM's own head."},
    )
    # Released VLMs: module names that mark a component, beyond the ones model/components.py knows.
    vision_modules: list[str] | None = field(default=None, metadata={"help": "Module names of the vision tower."})
    connector_modules: list[str] | None = field(default=None, metadata={"help": "Module names of the connector."})
    llm_modules: list[str] | None = field(default=None, metadata={"help": "Module names of the LLM."})
    # The processor's pixel budget, for families that resize to it (Qwen2-VL: min_pixels/max_pixels).
    min_pixels: int | None = field(default=None, metadata={"help": "Released VLM: the processor's min_pixels."})
    max_pixels: int | None = field(default=None, metadata={"help": "Released VLM: the processor's max_pixels."})
    bits: int = field(default=16, metadata={"help": "16, or 8 / 4 for bitsandbytes QLoRA."})
    quant_type: str = field(default="nf4", metadata={"help": "4-bit type: nf4 | fp4."})
    double_quant: bool = field(default=True)

    def __post_init__(self):
        if self.vlm_model and (self.vision_model or self.llm_model):
            set_ = " and ".join(f"--{k} {v}" for k, v in (("vision_model", self.vision_model), ("llm_model", self.llm_model)) if v)
            raise ConfigError(
                f"--vlm_model {self.vlm_model} is a whole VLM, but {set_} also names a composed base's part. "
                "Keep --vlm_model to fine-tune the released model, or drop it to compose a tower and an LLM."
            )
        if not self.vlm_model:
            self.vision_model = self.vision_model or DEFAULT_VISION
            self.llm_model = self.llm_model or DEFAULT_LLM
        if self.connector not in CONNECTORS:
            raise ConfigError(f"--connector {self.connector!r}: choose one of {', '.join(CONNECTORS)} (model/connectors/).")
        if self.lora_target not in ("llm", "vit", "both"):
            raise ConfigError(f"--lora_target {self.lora_target!r}: choose llm, vit or both.")
        if self.bits not in (4, 8, 16):
            raise ConfigError(f"--bits {self.bits}: choose 16, 8 or 4.")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ConfigError("--vision_feature_select_strategy: choose default or full.")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"--dtype {self.dtype!r}: choose float32, bfloat16 or float16.")
        refuse_conflicts(self)

    @property
    def component_modules(self) -> dict[str, list[str] | None]:
        return {"vision": self.vision_modules, "connector": self.connector_modules, "llm": self.llm_modules}

    @property
    def lora_on_llm(self) -> bool:
        return self.lora_enable and self.lora_target in ("llm", "both")

    @property
    def lora_on_vit(self) -> bool:
        return self.lora_enable and self.lora_target in ("vit", "both")


def refuse_conflicts(args: ModelArguments) -> None:
    """Flag combinations that cannot mean what the user wants, refused before any model loads.
    The README's freeze matrix lists every combination and what it trains."""
    if args.lora_on_llm and not args.freeze_llm:
        raise ConfigError(
            "--freeze_llm false trains every LLM weight, so --lora_enable true with --lora_target "
            f"{args.lora_target} would add adapters to weights that already train. Use either "
            "--freeze_llm true (LoRA) or --lora_target vit / --lora_enable false (full finetune)."
        )
    if args.lora_on_vit and not args.freeze_vit:
        raise ConfigError(
            f"--lora_target {args.lora_target} puts LoRA on the vision tower but --freeze_vit false "
            "also trains all of its weights. Say which you meant: --freeze_vit true for vision "
            "LoRA, or --lora_target llm to fully train the tower."
        )
    if args.bits < 16 and not args.freeze_llm:
        raise ConfigError(
            f"--bits {args.bits} loads the LLM quantized, whose weights cannot train, but "
            "--freeze_llm false asks to train them. Use --freeze_llm true with --lora_enable true "
            "(QLoRA), or --bits 16 for a full finetune."
        )
    if args.lora_top_layers is not None and not (0 < args.lora_top_layers <= 1 and args.lora_on_llm):
        raise ConfigError(
            f"--lora_top_layers {args.lora_top_layers} is the fraction of the LLM's layers (0 < x <= 1) whose "
            "LoRA trains: it needs LoRA on the LLM (--lora_enable true, --lora_target llm or both)."
        )
    if args.freeze_lora and not args.lora_enable:
        raise ConfigError(
            "--freeze_lora true freezes LoRA adapters, but --lora_enable is false so there are "
            "none. Drop --freeze_lora, or set --lora_enable true (with --init_from a LoRA stage)."
        )
    lora_trains = args.lora_enable and not args.freeze_lora
    if (
        args.freeze_vit and args.freeze_qformer and args.freeze_llm
        and not lora_trains and not args.trainable_regex
    ):
        raise ConfigError(
            "Nothing left to train: --freeze_vit, --freeze_qformer and --freeze_llm are true and "
            "no LoRA trains (--lora_enable false or --freeze_lora true) and --trainable_regex is "
            "empty. Unfreeze a component or enable LoRA."
        )


@dataclass
class DataArguments:
    data_path: str | None = field(
        default=None, metadata={"help": "LLaVA-format .json or .jsonl training file."}
    )
    image_folder: str | None = field(default=None, metadata={"help": "Root of image paths."})
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A messages-format dataset: hub id, save_to_disk folder, or .json/.jsonl/.parquet."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of --dataset_name."})
    eval_data_path: str | None = field(
        default=None,
        metadata={"help": "Held-out records (LLaVA or messages format, as data_path / dataset_name): "
                          "exact-match accuracy after training, and every --eval_steps during it."},
    )
    eval_image_folder: str | None = field(default=None, metadata={"help": "Root of eval image paths; default image_folder."})
    eval_dataset_split: str = field(default="test", metadata={"help": "Split of a hub-id --eval_data_path."})
    eval_max_samples: int = field(
        default=200,
        metadata={"help": "Evaluation during training (--eval_steps) answers at most this many held-out records, "
                  "one seeded sample for the whole run; 0: all. The accuracy after training reads them all."},
    )
    max_length: int = field(default=2048, metadata={"help": "Tokens, image tokens included."})
    chat_template: str | None = field(
        default=None,
        metadata={"help": "A .jinja file that replaces the tokenizer's chat template."},
    )
    validate_data: bool = field(
        default=True,
        metadata={"help": "Check every record and image before step 1 (cached by file hash)."},
    )
    skip_bad_samples: bool = field(
        default=False,
        metadata={
            "help": "Train on the good records instead of refusing to start; the skipped "
            "ones go to OUTPUT_DIR/skipped_records.jsonl."
        },
    )
    num_frames: int = field(
        default=8, metadata={"help": "Frames sampled uniformly from each video (a folder of frames)."}
    )
    data_check_cache: str | None = field(
        default=None, metadata={"help": "Cache of data checks; default ~/.cache/vlm-finetune/data-check."}
    )
    make_demo_data_if_missing: bool = field(
        default=False, metadata={"help": "Demo only: generate the synthetic shapes set if absent."}
    )
    demo_train_size: int = field(default=4000)
    demo_eval_size: int = field(default=200)


@dataclass
class TrainArguments(DeviceSetupHooks):  # patches.py: accelerate's state without a GPU
    output_dir: str = field(default="outputs/run")
    vision_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the vision tower; default learning_rate."}
    )
    connector_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the connector; default learning_rate."}
    )
    init_from: str | None = field(
        default=None, metadata={"help": "Start from an earlier stage's checkpoint (its delta)."}
    )
    dry_run: bool = field(
        default=False, metadata={"help": "Print the freeze table and memory plan, then exit."}
    )
    # Here, beside transformers' own train_sampling_strategy (group_by_length): it changes only
    # the order the Trainer draws samples in, never what is read.
    group_by_modality_length: bool = field(
        default=False,
        metadata={"help": "Batches of one modality (image or text-only) and similar length (LLaVA's)."},
    )
    # transformers' 500 leaves a shorter run without a single logged loss: a fraction of the run's
    # steps logs in every run. A config's own count is kept; the last step logs anyway (LogLastStep).
    logging_steps: float = field(
        default=0.01,
        metadata={"help": "Steps between loss logs, and the last step always logs; a float < 1 is a fraction of "
                  "the run (0.01: about 100 points, every step of a run under 100)."},
    )
    eval_steps: float | None = field(
        default=None,
        metadata={"help": "Evaluate every N steps (a float < 1: that fraction of the run), turning on --eval_strategy "
                  "steps: exact-match accuracy of generated answers on eval_max_samples records of --eval_data_path, "
                  f"logged as eval_accuracy. --eval_strategy steps alone evaluates every {DEFAULT_EVAL_STEPS:g} of the run."},
    )
    # The collator's batch keys are the model's inputs; the Trainer must not drop pixel_values.
    remove_unused_columns: bool = field(default=False)
    # Every trainable parameter gets a gradient on every rank (frozen ones are not registered,
    # text-only batches run a blank image), so DDP needs no unused-parameter search.
    ddp_find_unused_parameters: bool | None = field(default=False)

    def __post_init__(self):
        # Without a GPU, accelerate treats `torchrun --nproc_per_node=N` as N unrelated single
        # processes unless told to use the CPU; then the same code runs DDP over gloo. Not under
        # DeepSpeed: `use_cpu` would bypass it (see patches.DeviceSetupHooks).
        if not torch.cuda.is_available() and not torch.backends.mps.is_available() and not self.deepspeed:
            self.use_cpu = True
        # --eval_steps alone asks for evaluation. --eval_strategy steps alone would evaluate every
        # logging_steps (transformers' fallback): a hundred generation passes at our default.
        if self.eval_steps and self.eval_strategy == IntervalStrategy.NO:
            self.eval_strategy = IntervalStrategy.STEPS
        elif self.eval_strategy == IntervalStrategy.STEPS and not self.eval_steps:
            self.eval_steps = DEFAULT_EVAL_STEPS
        super().__post_init__()
        if self.group_by_modality_length and self.train_sampling_strategy != "random":
            raise ConfigError(
                f"--group_by_modality_length true chooses the sampler, and so does --train_sampling_strategy "
                f"{self.train_sampling_strategy}: keep one."
            )
        cap_dataloader_workers(self)  # a recipe's 4 workers on a 2-core machine starve the step


ALL_ARGUMENTS = (ModelArguments, DataArguments, TrainArguments)


def _as_cli(key: str, value) -> list[str]:
    """One YAML entry as the command-line words HfArgumentParser reads."""
    if value is None:
        return []
    if isinstance(value, bool):
        return [f"--{key}", "true" if value else "false"]
    if isinstance(value, (list, tuple)):
        # An empty list means the default: `--key` with no values is an argparse error.
        return [f"--{key}", *map(str, value)] if value else []
    if isinstance(value, dict):
        return [f"--{key}", json.dumps(value)]
    return [f"--{key}", str(value)]


def _unknown_settings(keys, known: set[str], where: str) -> list[str]:
    """One line per key that is no setting, naming the closest valid one."""
    lines = []
    for key in keys:
        if key in known:
            continue
        if key.replace("-", "_") in known:  # argparse's dashed alias: one spelling here
            hint = f"did you mean {key.replace('-', '_')!r}? Settings are spelled with underscores."
        elif key.startswith(("no_", "no-")) and key[3:].replace("-", "_") in known:
            name = key[3:].replace("-", "_")
            hint = f"did you mean {name!r} set to false ({'--' + name + ' false' if where == CLI else name + ': false'})?"
        else:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "no setting is close to it."
        lines.append(f"{key!r} {'on' if where == CLI else 'in'} {where}: {hint}")
    return lines


CLI = "the command line"
HELP_ALL = "--help_all"


def _refuse_bad_value(message: str):
    """argparse's error for a value it cannot read: its exit (status 2), with one line instead of
    the usage of 200 options, and the setting named as it is spelled here."""
    message = re.sub(r"argument (--\w+)(?:/-{1,2}[\w-]+)*", r"\1", message).rstrip(". ")
    print(f"error: {message}. `python {prog()} --help` shows each setting and its values.", file=sys.stderr)
    raise SystemExit(2)


def parse_config(argv: list[str] | None = None, default_yaml: str | None = DEMO_CONFIG):
    """`[config.yaml] [--key value ...]` -> (ModelArguments, DataArguments, TrainArguments).

    YAML values become command-line words placed before the real ones, so the command line
    wins. With no words at all the demo config is used. `-h`/`--help` prints the settings
    (`--help_all`: transformers' too) and exits.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help", HELP_ALL} & set(argv):
        print(format_help(ALL_ARGUMENTS, everything=HELP_ALL in argv))
        raise SystemExit(0)
    yaml_path = argv.pop(0) if argv and argv[0].endswith((".yaml", ".yml")) else None
    if yaml_path is None and not argv:
        yaml_path = default_yaml

    parser = HfArgumentParser(ALL_ARGUMENTS, allow_abbrev=False)
    parser.error = _refuse_bad_value
    known = {f.name for cls in ALL_ARGUMENTS for f in dataclasses.fields(cls) if f.init}

    words: list[str] = []
    unknown: list[str] = []
    if yaml_path:
        settings = _read_yaml(yaml_path)
        unknown += _unknown_settings(settings, known, yaml_path)
        for key, value in settings.items():
            words += _as_cli(key, value)
    unknown += _unknown_settings([w[2:].split("=")[0] for w in argv if w.startswith("--")], known, CLI)
    if unknown:  # every one at once, not one per launch
        listed = f"Unknown setting {unknown[0]}" if len(unknown) == 1 else "\n  ".join(["Unknown settings:", *unknown])
        raise ConfigError(f"{listed}\nFix the spelling; `python {prog()} --help` lists every setting.")
    model_args, data_args, train_args, rest = parser.parse_args_into_dataclasses(
        args=words + argv, return_remaining_strings=True
    )
    if rest:
        raise ConfigError(f"Unexpected command-line words {rest}: settings are --key value.")
    check_logging(train_args)
    check_evaluation(data_args, train_args)
    return model_args, data_args, train_args


def _sharded_engine(train_args) -> str | None:
    """The engine's name when the settings shard the weights across ranks, else None."""
    if train_args.fsdp:
        return "FSDP"
    if train_args.deepspeed and train_args.hf_deepspeed_config.is_zero3():
        return "DeepSpeed ZeRO-3"
    return None


def check_evaluation(data_args, train_args) -> None:
    """Evaluation during training (--eval_strategy / --eval_steps), refused before any model
    loads where it cannot run, rather than skipped at every evaluation of a long run."""
    if train_args.eval_strategy == IntervalStrategy.NO:
        return
    asked = f"--eval_strategy {train_args.eval_strategy.value}"
    if train_args.eval_strategy == IntervalStrategy.STEPS:
        asked += f" --eval_steps {train_args.eval_steps:g}"
    if not data_args.eval_data_path:
        raise ConfigError(
            f"{asked} evaluates on held-out records, but --eval_data_path is empty. Set it (a LLaVA "
            "or messages-format file or dataset), or drop --eval_strategy and --eval_steps."
        )
    engine = _sharded_engine(train_args)
    if engine:
        # Each rank answers its own share of records, so each must run the whole model alone;
        # sharded, every forward pass is a collective of all ranks in step. (train.py skips its
        # evaluation after training there too, with a note: that one the user did not ask for.)
        raise ConfigError(
            f"{asked} generates answers on each rank alone, but {engine} shards the weights across ranks. "
            "Drop --eval_strategy and --eval_steps (train with DDP or ZeRO-1/2 to evaluate during training), "
            f"and score checkpoints afterwards: python infer.py --checkpoint CKPT --data {data_args.eval_data_path}"
        )


def _read_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            settings = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file. Give the path of a YAML config (the recipes are in configs/), "
            "or none for the demo."
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"{path}: a config is a mapping of settings (`key: value` lines), not {type(settings).__name__}.")
    return settings


def config_dict(model_args, data_args, train_args) -> dict:
    return {
        "model": dataclasses.asdict(model_args),
        "data": dataclasses.asdict(data_args),
        "train": train_args.to_dict(),
    }


def save_resolved_config(path: str, model_args, data_args, train_args) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(config_dict(model_args, data_args, train_args), f, sort_keys=False)
