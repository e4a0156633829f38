"""The settings of a run, in three typed dataclasses: what model is built, what it reads, how it trains.

    python train.py configs/lora.yaml --learning_rate 1e-4     # the command line wins

`ModelArguments` says what model is built and which parts train; it lives beside the model
(model/settings.py: it is the manifest's schema) and is imported here, so that `ALL_ARGUMENTS`
holds the three. `DataArguments` says what it reads. `TrainArguments` is
transformers' `TrainingArguments` plus the few knobs this pipeline adds. `cli.parse_config` reads
them from YAML + the command line and calls `check_evaluation`, the one check that needs two of
them; `run.environment.adapt_to_machine` fits them to the machine (workers, wandb), called by
train.py. Nothing here prints or reads the machine, but whether it has a GPU.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch
import yaml
from transformers.trainer_utils import IntervalStrategy

from constants import NUM_FRAMES
from errors import ConfigError
from model.settings import ModelArguments
from patches import DeviceSetupHooks

DEFAULT_EVAL_STEPS = 0.1  # a tenth of the run: generation costs far more than a logged loss
STAGES = ("sft", "dpo")


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
        default=NUM_FRAMES, metadata={"help": "Frames sampled uniformly from each video (a folder of frames)."}
    )
    data_check_cache: str | None = field(
        default=None, metadata={"help": "Cache of data checks; default ~/.cache/vlm-finetune/data-check."}
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Rows of whole samples up to --packing_length, none seeing another (positions restart, "
                  "block-diagonal causal mask): no compute spent on padding. --per_device_train_batch_size "
                  "then counts rows (docs/packing.md)."},
    )
    packing_length: int | None = field(
        default=None, metadata={"help": "Tokens per packed row, image tokens included; default max_length."}
    )

    def __post_init__(self):
        if self.packing_length is not None and self.packing_length < self.max_length:
            raise ConfigError(
                f"--packing_length {self.packing_length} is shorter than --max_length {self.max_length}: a sample "
                f"that long would fit no row. Raise --packing_length to at least {self.max_length}, or lower --max_length."
            )

    @property
    def row_length(self) -> int:
        """Tokens per packed row."""
        return self.packing_length or self.max_length


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
    # The stage picks what is read and what is optimised; everything else (freeze flags, LoRA,
    # deltas, the loader, resume, DDP/ZeRO) is the same machinery. docs/preference_tuning.md.
    stage: str = field(
        default="sft",
        metadata={"help": "sft: supervised answers (LLaVA records); dpo: preference pairs (chosen/rejected), "
                  "DPO's sigmoid loss against the model as it stands at step 0."},
    )
    dpo_beta: float = field(
        default=0.1, metadata={"help": "DPO's beta: how far the policy may move from the reference (TRL's beta)."}
    )
    dpo_sft_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of a supervised (NLL) term on the chosen answers added to the DPO loss; 0: off."},
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

    # transformers' False would leave `torchrun --nproc_per_node=N` without a GPU as N unrelated
    # processes: accelerate forms a CPU process group (DDP over gloo) only when told it runs on the CPU.
    use_cpu: bool | None = field(
        default=None,
        metadata={"help": "Train on the CPU; default: true on a machine without a GPU, unless under --deepspeed."},
    )

    def __post_init__(self):
        # Decided before TrainingArguments.__post_init__: that builds accelerate's device state (its
        # `self.device` step), which reads use_cpu once. DeepSpeed places itself: use_cpu would bypass it.
        if self.use_cpu is None:
            self.use_cpu = not self.deepspeed and not torch.cuda.is_available() and not torch.backends.mps.is_available()
        # --eval_steps alone asks for evaluation. --eval_strategy steps alone would evaluate every
        # logging_steps (transformers' fallback): a hundred generation passes at our default.
        if self.eval_steps and self.eval_strategy == IntervalStrategy.NO:
            self.eval_strategy = IntervalStrategy.STEPS
        elif self.eval_strategy == IntervalStrategy.STEPS and not self.eval_steps:
            self.eval_steps = DEFAULT_EVAL_STEPS
        super().__post_init__()
        if self.stage not in STAGES:
            raise ConfigError(f"--stage {self.stage}: unknown stage; choose one of {', '.join(STAGES)}.")
        if self.dpo_beta <= 0:
            raise ConfigError(f"--dpo_beta {self.dpo_beta:g}: DPO's beta must be > 0 (0.1 is the usual value).")
        if self.group_by_modality_length and self.train_sampling_strategy != "random":
            raise ConfigError(
                f"--group_by_modality_length true chooses the sampler, and so does --train_sampling_strategy "
                f"{self.train_sampling_strategy}: keep one."
            )


def _sharded_engine(train_args) -> str | None:
    """The engine's name when the settings shard the weights across ranks, else None."""
    if train_args.fsdp:
        return "FSDP"
    if train_args.deepspeed and train_args.hf_deepspeed_config.is_zero3():
        return "DeepSpeed ZeRO-3"
    return None


ALL_ARGUMENTS = (ModelArguments, DataArguments, TrainArguments)


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


def check_packing(data_args, train_args) -> None:
    """--packing true chooses the batches, so a second sampler setting is refused (the modality
    grouping is the packer's own: rows of one kind per step)."""
    if data_args.packing and train_args.train_sampling_strategy != "random":
        raise ConfigError(
            f"--packing true chooses the batches, and so does --train_sampling_strategy "
            f"{train_args.train_sampling_strategy}: keep one."
        )
    if data_args.packing and train_args.stage == "dpo":
        # A pair's two rows share one prompt and its images; rows of several pairs are not built.
        raise ConfigError("--packing true packs supervised samples; --stage dpo trains pairs unpacked. "
                          "Drop --packing for the DPO stage.")


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
