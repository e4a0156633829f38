"""bitsandbytes QLoRA: how a base loads in 8 or 4 bits, for a composed and a released base alike."""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import BitsAndBytesConfig
from transformers.quantizers import AutoHfQuantizer

# Kept in full precision in a quantized base, at training and at inference alike (a different
# skip list at inference is LLaVA #433's size-mismatch). The connector is not part of the
# quantized model at all.
QUANT_SKIP_MODULES = ["lm_head"]


def _quantization_config(args, dtype, skip_modules: list[str]) -> BitsAndBytesConfig:
    if args.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=args.quant_type,
        bnb_4bit_use_double_quant=args.double_quant,
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=skip_modules,
    )


def load_kwargs(args, quantize: bool, skip_modules: list[str] = QUANT_SKIP_MODULES) -> dict:
    """from_pretrained's dtype, and under --bits 8/4 its bitsandbytes config and device."""
    dtype = getattr(torch, args.dtype)
    if not quantize:
        return {"dtype": dtype}
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    return {
        "dtype": dtype,
        "quantization_config": _quantization_config(args, dtype, skip_modules),
        "device_map": {"": device},
    }


def quantize_without_weights(model: nn.Module, args, skip_modules: list[str] = QUANT_SKIP_MODULES) -> nn.Module:
    """A model built on the meta device (`--dry_run`), laid out as `from_pretrained` with `load_kwargs`
    would load it: the same quantizer replaces the same linear layers by bitsandbytes' (its own skip
    rules, ours, the tied head's), before any weight exists. The layers' weights stay empty, their
    quantization planned (model/memory_plan.py counts what quantizing would store), so QLoRA is
    planned from a config.json alone, as 16-bit recipes are."""
    dtype = getattr(torch, args.dtype)
    quantizer = AutoHfQuantizer.from_config(_quantization_config(args, dtype, skip_modules), pre_quantized=False)
    quantizer.preprocess_model(model, dtype=dtype, device_map={"": "meta"})
    return quantizer.postprocess_model(model)


def is_bitsandbytes_weight(param: torch.Tensor) -> bool:
    """Whether `param` is a bitsandbytes weight (Params4bit, Int8Params): quantized, or on a model
    without weights (`quantize_without_weights`) to be quantized, where its dtype is still a float."""
    return not param.dtype.is_floating_point or hasattr(param, "quant_type") or hasattr(param, "has_fp16_weights")
