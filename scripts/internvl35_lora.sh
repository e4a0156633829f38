#!/usr/bin/env bash
# InternVL3.5-8B, LoRA on the LLM, projector trained: configs/internvl35_lora.yaml.
#   DATA=train.json IMAGES=images/ bash scripts/internvl35_lora.sh [--max_steps 10 ...]   (MODEL, OUT, NPROC too)
exec bash "$(dirname "$0")/launch.sh" configs/internvl35_lora.yaml "$@"
