#!/usr/bin/env bash
# LLaVA-OneVision 7B, LoRA on the LLM, projector and image_newline trained: configs/llava_onevision_lora.yaml.
#   DATA=train.json IMAGES=images/ bash scripts/llava_onevision_lora.sh [--max_steps 10 ...]   (MODEL, OUT, NPROC too)
exec bash "$(dirname "$0")/launch.sh" configs/llava_onevision_lora.yaml "$@"
