#!/usr/bin/env bash
# PaliGemma 2, frozen LLM, LoRA on its upper half's attention (openpi): configs/paligemma2_openpi.yaml.
#   DATA=train.json IMAGES=images/ bash scripts/paligemma2_openpi.sh [--max_steps 10 ...]   (MODEL, OUT, NPROC too)
exec bash "$(dirname "$0")/launch.sh" configs/paligemma2_openpi.yaml "$@"
