#!/usr/bin/env bash
# Ask-Anything (VideoChat2) style: stage 1 trains LoRA on the LLM with the vision tower and
# connector frozen; stage 2 keeps that LoRA in the graph, frozen, and trains the connector.
#   bash scripts/askanything.sh [--max_steps 10 ...]
set -euo pipefail
cd "$(dirname "$0")/.."  # paths below are relative to the repo root
NPROC=${NPROC:-8}
VISION=${VISION:-openai/clip-vit-large-patch14-336}
LLM=${LLM:-lmsys/vicuna-7b-v1.5}
DATA=${DATA:-data/train.json}
IMAGES=${IMAGES:-data/images}
OUT=${OUT:-outputs/askanything}

torchrun --nproc_per_node="$NPROC" train.py configs/askanything_stage1.yaml \
  --vision_model "$VISION" --llm_model "$LLM" \
  --data_path "$DATA" --image_folder "$IMAGES" --output_dir "$OUT/stage1" "$@"
torchrun --nproc_per_node="$NPROC" train.py configs/askanything_stage2.yaml \
  --vision_model "$VISION" --llm_model "$LLM" --init_from "$OUT/stage1" \
  --data_path "$DATA" --image_folder "$IMAGES" --output_dir "$OUT/stage2" "$@"
