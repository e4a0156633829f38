#!/usr/bin/env bash
# QLoRA: SigLIP + Qwen2.5-7B in 4-bit nf4, LoRA on the LLM, one GPU: configs/qlora.yaml.
#   DATA=train.json IMAGES=images/ bash scripts/qlora.sh [--max_steps 10 ...]   (VISION, LLM, OUT, INIT_FROM, NPROC too)
exec bash "$(dirname "$0")/launch.sh" configs/qlora.yaml "$@"
