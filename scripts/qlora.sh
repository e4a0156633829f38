#!/usr/bin/env bash
# QLoRA: SigLIP + Qwen2.5-7B in 4-bit nf4, LoRA on the LLM, checkpointing on. Fits one GPU;
# with several, each runs a data-parallel copy (NPROC=1 for one).
#   bash scripts/qlora.sh [--max_steps 10 ...]
set -euo pipefail
cd "$(dirname "$0")/.."  # paths below are relative to the repo root
# One process per visible GPU (as CUDA_VISIBLE_DEVICES shows them), 1 without one; NPROC=N overrides.
NPROC=${NPROC:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
echo "$(basename "$0"): $NPROC process(es); set NPROC to change"
VISION=${VISION:-google/siglip-so400m-patch14-384}
LLM=${LLM:-Qwen/Qwen2.5-7B-Instruct}
DATA=${DATA:-data/train.json}
IMAGES=${IMAGES:-data/images}
OUT=${OUT:-outputs/qlora}

# cli.py torchrun: torchrun, without the launcher's traceback when a rank stops on a user error.
python cli.py torchrun --nproc_per_node="$NPROC" train.py configs/qlora.yaml \
  --vision_model "$VISION" --llm_model "$LLM" \
  --data_path "$DATA" --image_folder "$IMAGES" --output_dir "$OUT" "$@"
