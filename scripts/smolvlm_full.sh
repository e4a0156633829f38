#!/usr/bin/env bash
# SmolVLM2-2.2B-Instruct, connector and LLM fully fine-tuned: configs/smolvlm_full.yaml.
#   DATA=train.json IMAGES=images/ bash scripts/smolvlm_full.sh [--max_steps 10 ...]   (MODEL, OUT, NPROC too)
exec bash "$(dirname "$0")/launch.sh" configs/smolvlm_full.yaml "$@"
