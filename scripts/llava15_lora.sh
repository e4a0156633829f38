#!/usr/bin/env bash
# LLaVA-1.5 LoRA: CLIP + Vicuna-7B, LoRA r=128 at 2e-4 and the projector at 2e-5, from the stage-1 projector (INIT_FROM): configs/llava15_lora.yaml.
#   DATA=train.json IMAGES=images/ bash scripts/llava15_lora.sh [--max_steps 10 ...]   (VISION, LLM, OUT, INIT_FROM, NPROC too)
exec bash "$(dirname "$0")/launch.sh" configs/llava15_lora.yaml "$@"
