#!/usr/bin/env bash
# MiniCPM-V 4.6, DPO with LoRA from an SFT checkpoint on RLAIF-V: configs/minicpmv46_dpo.yaml.
#   INIT_FROM=outputs/minicpmv46-lora bash scripts/minicpmv46_dpo.sh [--max_steps 10 ...]   (MODEL, DATA, IMAGES, OUT, NPROC too)
exec bash "$(dirname "$0")/launch.sh" configs/minicpmv46_dpo.yaml "$@"
