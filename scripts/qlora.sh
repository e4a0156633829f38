#!/usr/bin/env bash
# QLoRA on one GPU: SigLIP + Qwen2.5-7B in 4-bit nf4, LoRA on the LLM, checkpointing on.
#   bash scripts/qlora.sh [--max_steps 10 ...]
set -euo pipefail
cd "$(dirname "$0")/.."  # paths below are relative to the repo root
NPROC=${NPROC:-1}
VISION=${VISION:-google/siglip-so400m-patch14-384}
LLM=${LLM:-Qwen/Qwen2.5-7B-Instruct}
DATA=${DATA:-data/train.json}
IMAGES=${IMAGES:-data/images}
OUT=${OUT:-outputs/qlora}

torchrun --nproc_per_node="$NPROC" train.py configs/qlora.yaml \
  --vision_model "$VISION" --llm_model "$LLM" \
  --data_path "$DATA" --image_folder "$IMAGES" --output_dir "$OUT" "$@"
