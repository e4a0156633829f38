"""Data at the size people train: `train.py --max_steps 2` on a LLaVA-665K-shaped set of N records
(bench/llava_shaped.py) and the tiny base, from a cold data cache and again, against the same
command on 64 records.

    python -m bench.data_scale --records 200000 --ranks 1
    python -m bench.data_scale --records 200000 --ranks 2     # torchrun, 2 ranks on this node

Prints one row per run: wall seconds of the command (its first training step comes at the end
of its data pass and model load; two steps follow) and the CPU seconds of all its processes (what
a busy machine's wall clock hides), the pass's records/s (its own line), the largest peak RSS
of one process, the peak of the summed PSS of the run's processes (for 2 ranks, both ranks and
the launcher; the pass's workers while they run) and that sum at data-ready (TreeMemory), and
the load average of the machine beside it. Then the excess over the 64-record baseline, the
figures the targets are set on.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time

from bench.llava_shaped import make_llava_shaped
from fixtures.synthetic import vocabulary
from fixtures.tiny_base import make_tiny_base

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20


def _tree(root: int) -> list[int]:
    """`root` and every process under it."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _field(path: str, name: str) -> int:
    """A `Name:   N kB` field of a /proc file, in bytes (0 when the process is gone)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class TreeMemory(threading.Thread):
    """Samples a process tree four times a second: the peak of its summed PSS, the largest VmHWM
    (peak RSS) of any process in it, and the summed PSS at the first sample after every rank has
    reported its data (data/problems.py's line `N records, K bad`; None if no sample saw it).

    The peaks come at the first training steps, from the attention of the first batches (their
    lengths differ between a 64-record and a 200K-record set, and their timing between ranks):
    measured, the peak of the sum moves by ~200 MiB between runs of the same command. The PSS at
    data-ready holds what the ranks keep of the data, before any step: the figure the two-rank
    target is read on."""

    def __init__(self, root: int, log: str, ranks: int):
        super().__init__(daemon=True)
        self.root, self.log, self.ranks, self.done = root, log, ranks, False
        self.peak_pss, self.peak_rss, self.ready_pss = 0, 0, None

    def _data_ready(self) -> bool:
        with open(self.log, errors="replace") as f:
            return len(re.findall(r"records, \d+ bad", f.read())) >= self.ranks

    def run(self) -> None:
        while not self.done:
            pids = _tree(self.root)
            pss = sum(_field(f"/proc/{p}/smaps_rollup", "Pss") for p in pids)
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_rss = max([self.peak_rss] + [_field(f"/proc/{p}/status", "VmHWM") for p in pids])
            if self.ready_pss is None and self._data_ready():
                self.ready_pss = pss
            time.sleep(0.25)


def train_command(base: dict, data_path: str, image_folder: str, cache: str, out: str, ranks: int) -> list[str]:
    launcher = [sys.executable, "train.py"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "train.py"]
    return launcher + [
        "--vision_model", base["vision"], "--llm_model", base["llm"], "--data_path", data_path,
        "--image_folder", image_folder, "--data_check_cache", cache, "--output_dir", out,
        "--max_length", "2048", "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--save_strategy", "no", "--report_to", "none", "--dataloader_num_workers", "0",
        "--skip_bad_samples", "true", "--disable_tqdm", "true",
    ]


def timed_run(command: list[str], log: str, ranks: int) -> dict:
    load = os.getloadavg()[0]
    # One thread a process: on a shared 2-core machine OpenMP's spinning threads slow a tiny step 50x.
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log, "w") as f:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
        memory = TreeMemory(process.pid, log, ranks)
        memory.start()
        code = process.wait()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    memory.done = True
    memory.join()
    with open(log) as f:
        text = f.read()
    if code:
        raise SystemExit(f"{' '.join(command)} failed ({code}); its output: {log}\n{text[-3000:]}")
    found = re.search(r"data pass: .*?\((\d+) records/s", text)
    return {"seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "pass_records_per_s": int(found.group(1)) if found else None,
            "peak_rss_mib": round(memory.peak_rss / MIB), "peak_pss_mib": round(memory.peak_pss / MIB),
            "ready_pss_mib": None if memory.ready_pss is None else round(memory.ready_pss / MIB),
            "load_avg": round(load, 2)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--ranks", type=int, default=1, choices=(1, 2))
    parser.add_argument("--work_dir", default="outputs/data-scale")
    args = parser.parse_args(argv)
    work = os.path.abspath(args.work_dir)
    base_dir = os.path.join(work, "tiny-base")
    base = {"vision": os.path.join(base_dir, "vision"), "llm": os.path.join(base_dir, "llm")}
    if not os.path.isdir(base["llm"]):
        base = make_tiny_base(base_dir, vocabulary(), seed=0)
    small, large = make_llava_shaped(work, 64), make_llava_shaped(work, args.records)
    rows = {}
    for name, path in (("baseline_64", small), ("first_run", large), ("rerun", large)):
        cache = os.path.join(work, f"cache-{args.ranks}")
        if name != "rerun":
            shutil.rmtree(cache, ignore_errors=True)  # cold: nothing of an earlier pass
        command = train_command(base, path, work, cache, os.path.join(work, f"run-{args.ranks}"), args.ranks)
        rows[name] = timed_run(command, os.path.join(work, f"{name}-{args.ranks}.log"), args.ranks)
        print(f"data_scale ranks={args.ranks} records={64 if path == small else args.records} {name}: "
              + " ".join(f"{k}={v}" for k, v in rows[name].items()), flush=True)
    for run in ("first_run", "rerun"):
        excess = {}
        for k in ("peak_rss_mib", "peak_pss_mib", "ready_pss_mib"):
            value, baseline = rows[run][k], rows["baseline_64"][k]
            excess[k] = None if value is None or baseline is None else value - baseline
        print(f"data_scale ranks={args.ranks} {run} beyond baseline: " + " ".join(f"{k}={v}" for k, v in excess.items()))
    return rows


if __name__ == "__main__":
    main()
