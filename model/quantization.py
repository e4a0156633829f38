"""bitsandbytes QLoRA: how a base loads in 8 or 4 bits, for a composed and a released base alike."""

from __future__ import annotations

import os

import torch
from transformers import BitsAndBytesConfig

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
