#!/usr/bin/env bash
# Ask-Anything (VideoChat2) style: stage 1 trains LoRA on the LLM with the vision tower and
# connector frozen; stage 2 keeps that LoRA in the graph, frozen, and trains the connector.
#   bash scripts/askanything.sh [--max_steps 10 ...]
set -euo pipefail
cd "$(dirname "$0")/.."  # paths below are relative to the repo root
# One process per visible GPU (as CUDA_VISIBLE_DEVICES shows them), 1 without one; NPROC=N overrides.
NPROC=${NPROC:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
echo "$(basename "$0"): $NPROC process(es); set NPROC to change"
VISION=${VISION:-openai/clip-vit-large-patch14-336}
LLM=${LLM:-lmsys/vicuna-7b-v1.5}
DATA=${DATA:-data/train.json}
IMAGES=${IMAGES:-data/images}
OUT=${OUT:-outputs/askanything}

# cli.py torchrun: torchrun, without the launcher's traceback when a rank stops on a user error.
python cli.py torchrun --nproc_per_node="$NPROC" train.py configs/askanything_stage1.yaml \
  --vision_model "$VISION" --llm_model "$LLM" \
  --data_path "$DATA" --image_folder "$IMAGES" --output_dir "$OUT/stage1" "$@"
python cli.py torchrun --nproc_per_node="$NPROC" train.py configs/askanything_stage2.yaml \
  --vision_model "$VISION" --llm_model "$LLM" --init_from "$OUT/stage1" \
  --data_path "$DATA" --image_folder "$IMAGES" --output_dir "$OUT/stage2" "$@"
