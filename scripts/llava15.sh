#!/usr/bin/env bash
# LLaVA-1.5: projector pretraining (configs/llava15_pretrain.yaml), then the full LLM finetune from
# it (configs/llava15_finetune.yaml). Each stage reads its own data; OUT holds both stages.
#   PRETRAIN_DATA=558k.json PRETRAIN_IMAGES=images/ FINETUNE_DATA=665k.json FINETUNE_IMAGES=data/ \
#     bash scripts/llava15.sh [--max_steps 10 ...]                               (VISION, LLM, OUT, NPROC too)
set -euo pipefail
here=$(dirname "$0")
root=${OUT:-}  # each stage's OUT below is a folder of it
DATA=${PRETRAIN_DATA:-} IMAGES=${PRETRAIN_IMAGES:-} OUT=${root:+$root/pretrain} \
  bash "$here/launch.sh" configs/llava15_pretrain.yaml "$@"
DATA=${FINETUNE_DATA:-} IMAGES=${FINETUNE_IMAGES:-} OUT=${root:+$root/finetune} INIT_FROM=${root:+$root/pretrain} \
  bash "$here/launch.sh" configs/llava15_finetune.yaml "$@"
