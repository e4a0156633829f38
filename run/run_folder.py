"""The run folder's `checkpoint-N` lifecycle: a checkpoint counts once all of it is written, the
newest complete one is where a run resumes, and pruning never deletes it."""

from __future__ import annotations

import json
import os
import shutil

COMPLETE = "checkpoint_complete"  # written last: the Trainer's files (optimizer, RNG, state) too


def checkpoint_step(path: str) -> int | None:
    name = os.path.basename(os.path.normpath(path))
    digits = name[len("checkpoint-") :]
    return int(digits) if name.startswith("checkpoint-") and digits.isdigit() else None


def mark_complete(ckpt_dir: str) -> None:
    tmp = os.path.join(ckpt_dir, COMPLETE + ".tmp")
    with open(tmp, "w") as f:
        f.write("ok\n")
    os.replace(tmp, os.path.join(ckpt_dir, COMPLETE))  # atomic on POSIX


def is_complete(ckpt_dir: str) -> bool:
    return os.path.isfile(os.path.join(ckpt_dir, COMPLETE))


def _checkpoint_folders(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every `checkpoint-N` folder in `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    steps = ((checkpoint_step(name), os.path.join(output_dir, name)) for name in os.listdir(output_dir))
    return sorted((step, path) for step, path in steps if step is not None)


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete `checkpoint-N` in `output_dir`. A folder cut off mid-save (no
    completion mark) is never taken."""
    complete = [path for _, path in _checkpoint_folders(output_dir) if is_complete(path)]
    return complete[-1] if complete else None


def prune_checkpoints(output_dir: str, keep: int | None) -> None:
    """`save_total_limit` that never deletes the newest complete checkpoint: keeps the `keep`
    newest complete ones, and removes the leftovers of cut-off saves older than the newest."""
    folders = _checkpoint_folders(output_dir)
    complete = [path for _, path in folders if is_complete(path)]
    if not complete:
        return
    newest = checkpoint_step(complete[-1])
    doomed = complete[: -keep] if keep and keep > 0 else []
    doomed += [path for step, path in folders if step < newest and not is_complete(path)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)


def finished_step(ckpt_dir: str) -> int | None:
    """The step a checkpoint ended its run at (its trainer_state.json reached max_steps), or None
    if the run goes on from it. Resuming from a finished run must not train: the Trainer would
    run one step past max_steps."""
    path = os.path.join(ckpt_dir, "trainer_state.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        state = json.load(f)
    step, max_steps = state.get("global_step", 0), state.get("max_steps", 0)
    return step if max_steps and step >= max_steps else None
