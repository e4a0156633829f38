#!/usr/bin/env bash
# MiniCPM-V 4.6, LoRA on the LLM, merger trained: configs/minicpmv46_lora.yaml.
#   DATA=train.json IMAGES=images/ bash scripts/minicpmv46_lora.sh [--max_steps 10 ...]   (MODEL, OUT, NPROC too)
exec bash "$(dirname "$0")/launch.sh" configs/minicpmv46_lora.yaml "$@"
