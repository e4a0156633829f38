#!/usr/bin/env bash
# llava-hf/llava-1.5-7b-hf, LoRA on the LLM, projector trained: configs/llava_hf_lora.yaml.
#   DATA=train.json IMAGES=images/ bash scripts/llava_hf_lora.sh [--max_steps 10 ...]   (MODEL, OUT, NPROC too)
exec bash "$(dirname "$0")/launch.sh" configs/llava_hf_lora.yaml "$@"
