#!/usr/bin/env bash
# openpi style: frozen LLM, LoRA on the upper half of its layers' attention: configs/openpi_regex.yaml.
#   DATA=train.json IMAGES=images/ bash scripts/openpi.sh [--max_steps 10 ...]   (VISION, LLM, OUT, INIT_FROM, NPROC too)
exec bash "$(dirname "$0")/launch.sh" configs/openpi_regex.yaml "$@"
