#!/usr/bin/env bash
# LLaVA-1.5: CLIP ViT-L/14-336 + Vicuna-7B. Stage 1 trains the projector on 558K captions,
# stage 2 finetunes the LLM (vision tower frozen) on the 665K instruction mix, starting from
# stage 1's delta. Settings live in the configs; extra arguments go to both stages.
#   bash scripts/llava15.sh [--max_steps 10 ...]
set -euo pipefail
cd "$(dirname "$0")/.."  # paths below are relative to the repo root
# One process per visible GPU (as CUDA_VISIBLE_DEVICES shows them), 1 without one; NPROC=N overrides.
NPROC=${NPROC:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
echo "$(basename "$0"): $NPROC process(es); set NPROC to change"
VISION=${VISION:-openai/clip-vit-large-patch14-336}
LLM=${LLM:-lmsys/vicuna-7b-v1.5}
PRETRAIN_DATA=${PRETRAIN_DATA:-playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json}
PRETRAIN_IMAGES=${PRETRAIN_IMAGES:-playground/data/LLaVA-Pretrain/images}
FINETUNE_DATA=${FINETUNE_DATA:-playground/data/llava_v1_5_mix665k.json}
FINETUNE_IMAGES=${FINETUNE_IMAGES:-playground/data}
OUT=${OUT:-outputs/llava15}

# cli.py torchrun: torchrun, without the launcher's traceback when a rank stops on a user error.
python cli.py torchrun --nproc_per_node="$NPROC" train.py configs/llava15_pretrain.yaml \
  --vision_model "$VISION" --llm_model "$LLM" \
  --data_path "$PRETRAIN_DATA" --image_folder "$PRETRAIN_IMAGES" --output_dir "$OUT/pretrain" "$@"
python cli.py torchrun --nproc_per_node="$NPROC" train.py configs/llava15_finetune.yaml \
  --vision_model "$VISION" --llm_model "$LLM" --init_from "$OUT/pretrain" \
  --data_path "$FINETUNE_DATA" --image_folder "$FINETUNE_IMAGES" --output_dir "$OUT/finetune" "$@"
