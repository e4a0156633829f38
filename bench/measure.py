"""What scripts/bench.py measures inside a side's process: the device's peak FLOP/s, the first
loss, each step's wall and CPU time, peak RSS, and the tensor bytes one training step adds.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import tempfile
import time

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


class StepMemory:
    """The peak of tensor bytes that one training step allocates on top of what was live before
    it (the model, the optimizer's states): on a GPU from the CUDA allocator; on a CPU from the
    profiler's count of allocated tensor bytes (its "Total Allocated", the same definition).

    Not RSS (VmHWM, `ru_maxrss`): the first forward pages in ~50 MiB of libtorch code that is no
    tensor, and glibc keeps freed blocks resident, by up to +30% of a step here. Pinning glibc's
    mmap threshold to make RSS track live tensors, as scripts/bench_memory.py does, made steps
    2x slower here; timing must see the allocator users run."""

    def __init__(self, device):
        self.device = device

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
            self.profiler.start()

    def stop(self) -> int:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        self.profiler.stop()
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "trace.json")
            self.profiler.export_chrome_trace(path)
            with open(path) as f:
                events = json.load(f)["traceEvents"]
        # Counted from the start of profiling: blocks allocated before it are not in it.
        return max((e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"), default=0)


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
    (`StepMemory`): `.wall`, `.cpu`, `.rss_bytes`, `.step_bytes`."""
    import gc

    from transformers import TrainerCallback

    memory = StepMemory(device)

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
                self.rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
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
