"""What a newcomer sees first: `python train.py --help`, `python infer.py --help` and `python
scripts/x.py --help`, typed by path from another folder, print their usage and nothing else: no
warning a user cannot act on (bitsandbytes' "Failed to load CPU gemm_4bit_forward from
kernels-community" notice at import, a library's FutureWarning, a "No module named" from a
script run outside the repository's root). One subprocess per entry point."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def is_entry_point(path: str) -> bool:
    """A file a user runs (it has a `__main__` guard), not a module one imports (web_demo_panel.py)."""
    with open(path) as f:
        return 'if __name__ == "__main__":' in f.read()


# The benchmarks' entry points are their own package's (bench/), held by tests/bench.
ENTRY_POINTS = ["train.py", "infer.py"] + sorted(
    os.path.relpath(p, REPO_ROOT) for p in glob.glob(os.path.join(REPO_ROOT, "scripts", "*.py"))
    if not os.path.basename(p).startswith(("__init__", "bench")) and is_entry_point(p)
)


def test_every_entry_point_is_listed():
    assert {"train.py", "infer.py", "scripts/check_data.py", "scripts/export_hf.py", "scripts/web_demo.py"} <= set(
        ENTRY_POINTS
    )
    assert "scripts/web_demo_panel.py" not in ENTRY_POINTS  # imported by web_demo.py, never run


@pytest.mark.slow
@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_help_by_path_prints_its_usage_and_nothing_on_stderr(entry_point, tmp_path):
    # The environment a user's shell has: no pytest warning filters, no one-thread setting.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONWARNINGS", "OMP_NUM_THREADS"))}
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, entry_point), "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env={**env, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0 and "usage:" in result.stdout, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    assert result.stderr == "", f"{entry_point} --help printed on stderr:\n{result.stderr[-3000:]}"
