#!/usr/bin/env bash
# openpi style: frozen LLM, LoRA trained only on the layers a regex selects (see the config).
#   bash scripts/openpi.sh [--max_steps 10 ...]
set -euo pipefail
cd "$(dirname "$0")/.."  # paths below are relative to the repo root
NPROC=${NPROC:-8}
VISION=${VISION:-google/siglip-so400m-patch14-384}
LLM=${LLM:-Qwen/Qwen2.5-1.5B-Instruct}
DATA=${DATA:-data/train.json}
IMAGES=${IMAGES:-data/images}
OUT=${OUT:-outputs/openpi}

torchrun --nproc_per_node="$NPROC" train.py configs/openpi_regex.yaml \
  --vision_model "$VISION" --llm_model "$LLM" \
  --data_path "$DATA" --image_folder "$IMAGES" --output_dir "$OUT" "$@"
