#!/usr/bin/env bash
# The one launcher behind every recipe script: torchrun train.py CONFIG, one process per visible
# GPU (1 without one), and only what you pass overrides the config (which holds the model ids).
#   bash scripts/launch.sh configs/qwen25vl_lora.yaml [--max_steps 10 ...]
#   NPROC=4 MODEL=/my/copy DATA=train.json IMAGES=images/ OUT=outputs/x bash scripts/launch.sh CONFIG
set -euo pipefail
cd "$(dirname "$0")/.."  # paths are relative to the repo root
config=$1
shift
NPROC=${NPROC:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
echo "$(basename "$config"): $NPROC process(es); set NPROC to change"
overrides=()
[[ -n ${MODEL:-} ]] && overrides+=(--vlm_model "$MODEL")
[[ -n ${DATA:-} ]] && overrides+=(--data_path "$DATA")
[[ -n ${IMAGES:-} ]] && overrides+=(--image_folder "$IMAGES")
[[ -n ${OUT:-} ]] && overrides+=(--output_dir "$OUT")
# cli.py torchrun: torchrun, without the launcher's traceback when a rank stops on a user error.
python cli.py torchrun --nproc_per_node="$NPROC" train.py "$config" ${overrides[@]+"${overrides[@]}"} "$@"
