"""The model's settings: what is built (base ids, connector, LoRA, quantization) and which parts
train. The manifest's schema: every checkpoint stores its `ModelArguments`, so a checkpoint
rebuilds its model (run/checkpoint.py), as nanoGPT keeps `GPTConfig` beside its model.

Parsed from YAML + the command line with the run's other settings by `cli.parse_config`; a
combination that cannot mean what the user wants is refused here, before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from errors import ConfigError
from model.connectors import CONNECTORS

DEFAULT_VISION, DEFAULT_LLM = "openai/clip-vit-large-patch14-336", "lmsys/vicuna-7b-v1.5"  # LLaVA-1.5's


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
    docs/configuration.md's freeze matrix lists every combination and what it trains."""
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
