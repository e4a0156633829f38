#!/usr/bin/env bash
# The test suite on a fresh machine: installs everything it uses, then runs it. `.ci/run` runs
# exactly this; extra arguments go to pytest.
#   bash scripts/test.sh [tests/test_config.py -k unknown ...]
set -euo pipefail
cd "$(dirname "$0")/.."  # the repo root

# Everything the suite imports: the pipeline, the test tools, and the DeepSpeed extra
# (tests/test_deepspeed.py runs ZeRO-2/3 for real; DeepSpeed builds its ops on first install).
python -m pip install --quiet -r requirements-dev.txt -r requirements-deepspeed.txt

# tests/test_web_demo.py drives Debian's Chromium through Playwright (Playwright's own browser
# download is not reachable everywhere).
if ! command -v chromium >/dev/null; then
    if ! command -v apt-get >/dev/null; then
        echo "scripts/test.sh: no chromium and no apt-get: install Chromium (the web page's browser test needs it), then rerun." >&2
        exit 1
    fi
    if [ "$EUID" -eq 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        sudo apt-get update -qq
        sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    fi
fi

# vLLM's own environment (tests/test_vllm.py serves exports from it) installs in the background
# while the suite runs: the install is network- and disk-bound, the suite CPU-bound. The tests wait
# for the status file; a no-op when .venv-vllm already holds requirements-vllm.txt's pins.
export VLLM_ENV_LOG="${TMPDIR:-/tmp}/vllm_env.$$.log"
rm -f "$VLLM_ENV_LOG.status"
( set +e; bash scripts/vllm_env.sh >"$VLLM_ENV_LOG" 2>&1; echo $? >"$VLLM_ENV_LOG.status" ) &

# Everything: pyproject.toml's default leaves out the tests marked slow, distributed, deepspeed and
# browser (the fast run, `python -m pytest`); an empty marker expression lifts that. Set here, not
# on the command line, so that a `-m` passed to this script still wins.
export PYTEST_ADDOPTS="-m '' ${PYTEST_ADDOPTS:-}"
# One pytest worker per core (pytest-xdist): most tests are single-threaded Python or a subprocess
# of train.py, so a worker per core shares out the CPU time; worksteal keeps them busy to the end.
# pytest's exit status is this script's (not exec'd: the background build must not outlive it).
status=0
# --durations: the slowest tests at the end of the log, the list to trim when CI grows (tests/conftest.py
# starts the longest first).
python -m pytest -q -n auto --dist worksteal --durations=25 "$@" || status=$?
wait
exit "$status"
