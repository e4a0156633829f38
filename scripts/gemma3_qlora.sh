#!/usr/bin/env bash
# Gemma 3 4B it, QLoRA (4-bit LLM + LoRA), projector trained: configs/gemma3_qlora.yaml.
#   DATA=train.json IMAGES=images/ bash scripts/gemma3_qlora.sh [--max_steps 10 ...]   (MODEL, OUT, NPROC too)
exec bash "$(dirname "$0")/launch.sh" configs/gemma3_qlora.yaml "$@"
