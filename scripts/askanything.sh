#!/usr/bin/env bash
# Ask-Anything (VideoChat2) style: stage 1 trains LoRA with tower and connector frozen
# (configs/askanything_stage1.yaml); stage 2 freezes the LoRA and trains the connector from it
# (configs/askanything_stage2.yaml). OUT holds both stages.
#   DATA=train.json IMAGES=images/ bash scripts/askanything.sh [--max_steps 10 ...]   (VISION, LLM, OUT, NPROC too)
set -euo pipefail
here=$(dirname "$0")
root=${OUT:-}  # each stage's OUT below is a folder of it
OUT=${root:+$root/stage1} bash "$here/launch.sh" configs/askanything_stage1.yaml "$@"
OUT=${root:+$root/stage2} INIT_FROM=${root:+$root/stage1} bash "$here/launch.sh" configs/askanything_stage2.yaml "$@"
