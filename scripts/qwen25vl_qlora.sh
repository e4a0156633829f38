#!/usr/bin/env bash
# Qwen2.5-VL-7B-Instruct, QLoRA (4-bit LLM + LoRA), merger trained: configs/qwen25vl_qlora.yaml.
#   DATA=train.json IMAGES=images/ bash scripts/qwen25vl_qlora.sh [--max_steps 10 ...]   (MODEL, OUT, NPROC too)
exec bash "$(dirname "$0")/launch.sh" configs/qwen25vl_qlora.yaml "$@"
