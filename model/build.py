"""Build the model a config (or a checkpoint's manifest) describes: base towers, connector, LoRA."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
)

from model.connectors import CONNECTORS
from model.quantization import load_kwargs, quantize_without_weights
from model.released import build_released
from model.vision import VisionTower, load_vision_encoder
from model.vlm import VisionLanguageModel, VLMBase
from patches import keep_4bit_layout


def linear_module_names(module: nn.Module, exclude=("lm_head",)) -> list[str]:
    """Leaf names of every linear layer (`q_proj`, `fc1`, ...): LoRA's default targets."""
    names = {name.rsplit(".", 1)[-1] for name, m in module.named_modules() if isinstance(m, nn.Linear)}
    return sorted(names - set(exclude))


def _add_lora(module: nn.Module, args) -> nn.Module:
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_modules or linear_module_names(module),
    )
    return get_peft_model(module, config)


def build_model(args, weights: bool = True) -> VLMBase:
    """A released VLM (`--vlm_model`, model/released.py), or base towers from their ids or paths,
    a fresh connector and LoRA where the config asks.

    Which parameters train is not decided here but by `model.freeze.apply_freeze_policy`.
    `weights=False` (`--dry_run`): shapes only, on the meta device, from the two config.json
    files (quantized as loading would, under --bits 8/4); a 7B recipe is planned without
    downloading (or having memory for) its weights.
    """
    if args.vlm_model:
        return build_released(args, weights)
    quantize_vit = args.bits < 16 and args.lora_on_vit
    encoder = load_vision_encoder(
        args.vision_model, revision=args.vision_revision, weights=weights, **load_kwargs(args, quantize_vit)
    )
    if quantize_vit and not weights:
        encoder = quantize_without_weights(encoder, args)
    vision = VisionTower(encoder, args.vision_feature_layer, args.vision_feature_select_strategy)
    if weights:
        llm = AutoModelForCausalLM.from_pretrained(
            args.llm_model, revision=args.llm_revision, **load_kwargs(args, args.bits < 16)
        )
    else:
        with torch.device("meta"):
            llm = AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(args.llm_model, revision=args.llm_revision), dtype=getattr(torch, args.dtype)
            )
        if args.bits < 16:
            llm = quantize_without_weights(llm, args)

    llm_dim = llm.get_input_embeddings().embedding_dim
    connector = CONNECTORS[args.connector](vision.hidden_size, llm_dim, vision.num_tokens, args)
    connector.to(device=llm.device)

    if args.bits < 16:
        # Casts norms and embeddings to fp32 (the "expected Float, found BFloat16" errors of the
        # peers); checkpointing is ours to set, non-reentrant, in VisionLanguageModel.
        llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=False)
        keep_4bit_layout(llm)
        if quantize_vit:
            vision.encoder = prepare_model_for_kbit_training(vision.encoder, use_gradient_checkpointing=False)
            keep_4bit_layout(vision.encoder)
    if args.lora_on_llm:
        llm = _add_lora(llm, args)
    if args.lora_on_vit:
        vision.encoder = _add_lora(vision.encoder, args)

    return VisionLanguageModel(vision, connector, llm, connector.num_tokens, args)


def load_tokenizer_and_image_processor(args, chat_template_path: str | None = None):
    """(tokenizer, image_processor) of the base, with an optional chat template file."""
    tokenizer = AutoTokenizer.from_pretrained(args.llm_model, revision=args.llm_revision)
    if chat_template_path:
        with open(chat_template_path) as f:
            tokenizer.chat_template = f.read()
    if tokenizer.chat_template is None:
        raise ValueError(
            f"{args.llm_model} has no chat template: pass --chat_template FILE.jinja "
            "(configs/chat_templates/ has LLaVA's vicuna_v1)."
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    image_processor = AutoImageProcessor.from_pretrained(args.vision_model, revision=args.vision_revision)
    return tokenizer, image_processor
