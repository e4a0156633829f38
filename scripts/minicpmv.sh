#!/usr/bin/env bash
# MiniCPM-V style: SigLIP + perceiver resampler + Qwen2.5, LoRA on the LLM, resampler trained: configs/minicpmv.yaml.
#   DATA=train.json IMAGES=images/ bash scripts/minicpmv.sh [--max_steps 10 ...]   (VISION, LLM, OUT, INIT_FROM, NPROC too)
exec bash "$(dirname "$0")/launch.sh" configs/minicpmv.yaml "$@"
