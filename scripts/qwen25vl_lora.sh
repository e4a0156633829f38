#!/usr/bin/env bash
# Qwen2.5-VL-7B-Instruct, LoRA on the LLM, merger trained: configs/qwen25vl_lora.yaml.
#   DATA=train.json IMAGES=images/ bash scripts/qwen25vl_lora.sh [--max_steps 10 ...]   (MODEL, OUT, NPROC too)
exec bash "$(dirname "$0")/launch.sh" configs/qwen25vl_lora.yaml "$@"
