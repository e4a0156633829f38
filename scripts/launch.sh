#!/usr/bin/env bash
# The one launcher behind every recipe script: torchrun train.py CONFIG, one process per visible
# GPU (1 without one), and only what you pass overrides the config (which holds the model ids).
#   bash scripts/launch.sh configs/qwen25vl_lora.yaml [--max_steps 10 ...]
#   NPROC=4 DATA=train.json IMAGES=images/ OUT=outputs/x bash scripts/launch.sh CONFIG
# Variables, each passed only when set: MODEL (--vlm_model), VISION, LLM (a composed base's
# --vision_model, --llm_model), DATA, IMAGES, OUT, INIT_FROM (an earlier stage's checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."  # paths are relative to the repo root
config=$1
shift
NPROC=${NPROC:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
echo "$(basename "$config"): $NPROC process(es); set NPROC to change"
overrides=()
[[ -n ${MODEL:-} ]] && overrides+=(--vlm_model "$MODEL")
[[ -n ${VISION:-} ]] && overrides+=(--vision_model "$VISION")
[[ -n ${LLM:-} ]] && overrides+=(--llm_model "$LLM")
[[ -n ${INIT_FROM:-} ]] && overrides+=(--init_from "$INIT_FROM")
[[ -n ${DATA:-} ]] && overrides+=(--data_path "$DATA" --dataset_name "")  # a file wins over a config's dataset
[[ -n ${IMAGES:-} ]] && overrides+=(--image_folder "$IMAGES")
[[ -n ${OUT:-} ]] && overrides+=(--output_dir "$OUT")
# cli.py torchrun: torchrun, without the launcher's traceback when a rank stops on a user error.
python cli.py torchrun --nproc_per_node="$NPROC" train.py "$config" ${overrides[@]+"${overrides[@]}"} "$@"
