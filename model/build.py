"""Build the model a config (or a checkpoint's manifest) describes: base towers, connector, LoRA."""

from __future__ import annotations

import os

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
)

from model.connectors import build_connector, num_output_tokens
from model.fingerprint import fingerprint
from model.vision import VisionTower, load_vision_encoder
from model.vlm import VisionLanguageModel

# Kept in full precision in a quantized base, at training and at inference alike (a different
# skip list at inference is LLaVA #433's size-mismatch). The connector is not part of the
# quantized model at all.
QUANT_SKIP_MODULES = ["lm_head"]


def _quantization_config(args, dtype) -> BitsAndBytesConfig:
    if args.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=QUANT_SKIP_MODULES)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=args.quant_type,
        bnb_4bit_use_double_quant=args.double_quant,
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=QUANT_SKIP_MODULES,
    )


def _load_kwargs(args, quantize: bool) -> dict:
    dtype = getattr(torch, args.dtype)
    if not quantize:
        return {"dtype": dtype}
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    return {
        "dtype": dtype,
        "quantization_config": _quantization_config(args, dtype),
        "device_map": {"": device},
    }


def _keep_4bit_layout(module: nn.Module) -> None:
    """bitsandbytes (0.50) repacks a 4-bit weight in place, for a CPU with AVX512-BF16, the first
    time it runs in eval mode without grad (an evaluation, a generate). The repacked layer then
    multiplies through `gemv_4bit`, which has no backward: training after that silently drops
    every gradient through the frozen 4-bit weights (LoRA below it and the connector get wrong
    gradients) and the frozen weight's bytes and absmax (cast to bf16) have changed. Keep the
    training layout always."""
    import bitsandbytes as bnb

    for m in module.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


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


def build_model(args, weights: bool = True) -> VisionLanguageModel:
    """Base towers from their ids or paths, a fresh connector, LoRA where the config asks.

    Which parameters train is not decided here but by `model.freeze.apply_freeze_policy`.
    `weights=False` (`--dry_run`): shapes only, on the meta device, from the two config.json
    files; a 7B recipe is planned without downloading (or having memory for) its weights.
    """
    if not weights and args.bits < 16:
        raise ValueError("A model without weights cannot be quantized: load the weights to plan QLoRA.")
    quantize_vit = args.bits < 16 and args.lora_on_vit
    encoder = load_vision_encoder(
        args.vision_model, revision=args.vision_revision, weights=weights, **_load_kwargs(args, quantize_vit)
    )
    vision = VisionTower(encoder, args.vision_feature_layer, args.vision_feature_select_strategy)
    if weights:
        llm = AutoModelForCausalLM.from_pretrained(
            args.llm_model, revision=args.llm_revision, **_load_kwargs(args, args.bits < 16)
        )
        base_fingerprint = {"vision": fingerprint(vision), "llm": fingerprint(llm)}
    else:
        with torch.device("meta"):
            llm = AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(args.llm_model, revision=args.llm_revision), dtype=getattr(torch, args.dtype)
            )
        base_fingerprint = None

    llm_dim = llm.get_input_embeddings().embedding_dim
    connector = build_connector(args.connector, vision.hidden_size, llm_dim, vision.num_tokens, args)
    connector.to(device=llm.device)

    if args.bits < 16:
        # Casts norms and embeddings to fp32 (the "expected Float, found BFloat16" errors of the
        # peers); checkpointing is ours to set, non-reentrant, in VisionLanguageModel.
        llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=False)
        _keep_4bit_layout(llm)
        if quantize_vit:
            vision.encoder = prepare_model_for_kbit_training(vision.encoder, use_gradient_checkpointing=False)
            _keep_4bit_layout(vision.encoder)
    if args.lora_on_llm:
        llm = _add_lora(llm, args)
    if args.lora_on_vit:
        vision.encoder = _add_lora(vision.encoder, args)

    model = VisionLanguageModel(vision, connector, llm, num_output_tokens(connector, vision.num_tokens))
    if not args.fused_loss:
        model.fused_loss = False  # otherwise decided on the first training step
    model.build_args = args
    model.base_fingerprint = base_fingerprint
    return model


def load_processors(args, chat_template_path: str | None = None):
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
