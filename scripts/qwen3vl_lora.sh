#!/usr/bin/env bash
# Qwen3-VL-8B-Instruct, LoRA on the LLM, merger and DeepStack mergers trained: configs/qwen3vl_lora.yaml.
#   DATA=train.json IMAGES=images/ bash scripts/qwen3vl_lora.sh [--max_steps 10 ...]   (MODEL, OUT, NPROC too)
exec bash "$(dirname "$0")/launch.sh" configs/qwen3vl_lora.yaml "$@"
