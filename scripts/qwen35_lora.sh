#!/usr/bin/env bash
# Qwen3.5-9B, LoRA on the LLM, merger trained: configs/qwen35_lora.yaml.
#   DATA=train.json IMAGES=images/ bash scripts/qwen35_lora.sh [--max_steps 10 ...]   (MODEL, OUT, NPROC too)
exec bash "$(dirname "$0")/launch.sh" configs/qwen35_lora.yaml "$@"
