#!/usr/bin/env bash
# MiniCPM-V style: SigLIP + perceiver resampler + Qwen2.5, LoRA on the LLM, resampler trained.
#   bash scripts/minicpmv.sh [--freeze_vit false ...]
set -euo pipefail
cd "$(dirname "$0")/.."  # paths below are relative to the repo root
NPROC=${NPROC:-8}
VISION=${VISION:-google/siglip-so400m-patch14-384}
LLM=${LLM:-Qwen/Qwen2.5-7B-Instruct}
DATA=${DATA:-data/train.json}
IMAGES=${IMAGES:-data/images}
OUT=${OUT:-outputs/minicpmv}

torchrun --nproc_per_node="$NPROC" train.py configs/minicpmv.yaml \
  --vision_model "$VISION" --llm_model "$LLM" \
  --data_path "$DATA" --image_folder "$IMAGES" --output_dir "$OUT" "$@"
