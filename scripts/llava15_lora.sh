#!/usr/bin/env bash
# LLaVA-1.5 LoRA finetune (r=128, 2e-4; projector at 2e-5) from a stage-1 projector.
#   bash scripts/llava15_lora.sh [--max_steps 10 ...]
set -euo pipefail
cd "$(dirname "$0")/.."  # paths below are relative to the repo root
NPROC=${NPROC:-8}
VISION=${VISION:-openai/clip-vit-large-patch14-336}
LLM=${LLM:-lmsys/vicuna-7b-v1.5}
PRETRAINED=${PRETRAINED:-outputs/llava15/pretrain}
DATA=${DATA:-playground/data/llava_v1_5_mix665k.json}
IMAGES=${IMAGES:-playground/data}
OUT=${OUT:-outputs/llava15-lora}

torchrun --nproc_per_node="$NPROC" train.py configs/llava15_lora.yaml \
  --vision_model "$VISION" --llm_model "$LLM" --init_from "$PRETRAINED" \
  --data_path "$DATA" --image_folder "$IMAGES" --output_dir "$OUT" "$@"
