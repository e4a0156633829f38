"""What the benchmarks measure inside a process: the device's peak FLOP/s, the first loss, each
step's wall and CPU time, the resident set and its peak (one way, for every benchmark), and the
tensor bytes one training step adds (fixtures/tensor_peak.py's count).
"""

from __future__ import annotations

import statistics
import time

from fixtures.tensor_peak import TensorPeak

MEMORY_STEPS = 1  # after the timed ones (the optimizer's states exist by then); its time is not counted


def device_peak_flops(device, dtype) -> float:
    """FLOP/s of a large square matmul, best of a few: the device's practical peak in this process."""
    import torch

    n = 1536 if device.type == "cpu" else 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(4 if device.type == "cpu" else 20):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# --- the resident set: one reading for every benchmark -----------------------------------------------


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def rss_bytes() -> int:
    """This process's resident set now (VmRSS)."""
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """This process's own peak resident set (VmHWM). Not `getrusage(...).ru_maxrss`: Linux carries
    that across fork + exec, so a child of a large process (pytest with models loaded, a benchmark's
    parent) reports the parent's size as its peak; `RUSAGE_CHILDREN` is the largest of all
    children. VmHWM belongs to the exec-ed image alone."""
    return _status_bytes("VmHWM")


def reset_peak_rss() -> None:
    """Linux >= 4.0: make VmHWM start again from the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def first_loss(model, collate, batch_size: int, device) -> float:
    """The loss before any step, in eval mode (no dropout): equal on both sides when they compute
    the same function from the same weights. A sample at a time: eval's logits are [B, L, V]
    (623 MiB at batch 4 x 256 and a 152k vocabulary), which would set the peak RSS instead of
    training; every sample has as many labels, so the mean of means is the batch's."""
    import torch

    model.eval()
    losses = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for i in range(batch_size):
            sample = {k: v.to(device) for k, v in collate([{"idx": i}]).items()}
            losses.append(float(model(**sample).loss))
    loss0 = statistics.fmean(losses)
    del sample
    model.train()
    return loss0


def step_clock(device, timed_end: int):
    """A TrainerCallback that stamps the end of every step (wall and process CPU time), reads the
    peak RSS at the end of the timed steps, and counts the memory step, the one after them
    (`TensorPeak`): `.wall`, `.cpu`, `.rss_bytes`, `.step_bytes`."""
    import gc

    from transformers import TrainerCallback

    memory = TensorPeak(device)

    class StepClock(TrainerCallback):
        def __init__(self):
            self.wall, self.cpu, self.rss_bytes, self.step_bytes = [], [], None, None

        def on_step_begin(self, train_args, state, control, **kwargs):
            if state.global_step == timed_end:  # the memory step
                gc.collect()
                memory.start()

        def on_step_end(self, train_args, state, control, **kwargs):
            _sync(device)
            self.wall.append(time.perf_counter())
            self.cpu.append(time.process_time())
            if state.global_step == timed_end:
                # Before the memory step: its profiler records every allocation, and on the
                # SigLIP-so400m + Qwen2.5-0.5B shape it raised our heap's high water by 645 MiB
                # (the peer's by 200): the profiler's, not training's, host memory.
                self.rss_bytes = peak_rss_bytes()
            if state.global_step == timed_end + MEMORY_STEPS:
                self.step_bytes = memory.stop()

    return StepClock()


def tensor_bytes(tensors) -> int:
    import torch

    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total
