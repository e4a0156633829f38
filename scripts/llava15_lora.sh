#!/usr/bin/env bash
# LLaVA-1.5 LoRA finetune (r=128, 2e-4; projector at 2e-5) from a stage-1 projector.
#   bash scripts/llava15_lora.sh [--max_steps 10 ...]
set -euo pipefail
cd "$(dirname "$0")/.."  # paths below are relative to the repo root
# One process per visible GPU (as CUDA_VISIBLE_DEVICES shows them), 1 without one; NPROC=N overrides.
NPROC=${NPROC:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
echo "$(basename "$0"): $NPROC process(es); set NPROC to change"
VISION=${VISION:-openai/clip-vit-large-patch14-336}
LLM=${LLM:-lmsys/vicuna-7b-v1.5}
PRETRAINED=${PRETRAINED:-outputs/llava15/pretrain}
DATA=${DATA:-playground/data/llava_v1_5_mix665k.json}
IMAGES=${IMAGES:-playground/data}
OUT=${OUT:-outputs/llava15-lora}

# cli.py torchrun: torchrun, without the launcher's traceback when a rank stops on a user error.
python cli.py torchrun --nproc_per_node="$NPROC" train.py configs/llava15_lora.yaml \
  --vision_model "$VISION" --llm_model "$LLM" --init_from "$PRETRAINED" \
  --data_path "$DATA" --image_folder "$IMAGES" --output_dir "$OUT" "$@"
