"""What one side's process of bench/training.py does: build the side, warm up, train
`warmup_steps + steps` through the Trainer's loop (ours: VLMTrainer; the peer: TRL's SFTTrainer or
transformers' Trainer), then measure (bench/measure.py) and return the figures the parent's table
prints.
"""

from __future__ import annotations

import statistics
import tempfile

from bench.arguments import BenchArguments
from bench.measure import MEMORY_STEPS, device_peak_flops, first_loss, step_clock, tensor_bytes
from bench.sides import Side, build_side


def make_trainer(args: BenchArguments, side: str, built: Side, clock, device):
    """Ours: VLMTrainer; the peer: TRL's SFTTrainer (or transformers' Trainer). The same loop
    settings on both sides, over `warmup_steps + steps + MEMORY_STEPS` steps of the same batches."""
    from datasets import Dataset

    steps = args.warmup_steps + args.steps + MEMORY_STEPS
    dataset = Dataset.from_dict({"idx": [i % args.batch_size for i in range(args.batch_size * steps)]})
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="bench-"),
        per_device_train_batch_size=args.batch_size,
        max_steps=steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        activation_checkpointing=args.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        bf16=device.type == "cuda",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
    )
    data = dict(model=built.model, train_dataset=dataset, data_collator=built.collate, callbacks=[clock])
    if side == "ours":
        from config import TrainArguments
        from run.trainer import VLMTrainer

        return VLMTrainer(args=TrainArguments(**common), **data)
    if args.peer_trainer == "sft":
        from trl import SFTConfig, SFTTrainer

        from bench.patches import cap_trl_chunk_size
        from fixtures.tiny_base import build_tokenizer

        # TRL scores the LM head in tiles 32768 words wide: a fraction of a real vocabulary
        # (Qwen2.5: 151,936) but 8x all of cpu_small's, where the tile's unused columns would
        # count against the peer. No wider than the vocabulary, it costs what it does at a real one.
        cap_trl_chunk_size(built.vocab)
        config = SFTConfig(**common, gradient_checkpointing=args.gradient_checkpointing,
                           dataset_kwargs={"skip_prepare_dataset": True})
        # SFTTrainer wants a tokenizer; the batches are already token ids, so any one does.
        return SFTTrainer(args=config, processing_class=build_tokenizer(["a b c"], vocab_size=300), **data)
    from transformers import Trainer, TrainingArguments

    return Trainer(args=TrainingArguments(**common), **data)


def run_side(args: BenchArguments, side: str, recipe: str) -> dict:
    """In the child: build one side, warm up, train `warmup_steps + steps`, measure."""
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak_flops = device_peak_flops(device, torch.float32 if device.type == "cpu" else torch.bfloat16)
    built = build_side(args, side, recipe, device)
    loss0 = first_loss(built.model, built.collate, args.batch_size, device)
    clock = step_clock(device, args.warmup_steps + args.steps)
    trainer = make_trainer(args, side, built, clock, device)
    train_loss = trainer.train().training_loss
    return side_result(args, side, recipe, built, trainer, clock, device) | {
        "loss0": loss0, "train_loss": train_loss, "device_flops": peak_flops,
    }


def side_result(args: BenchArguments, side: str, recipe: str, built: Side, trainer, clock, device) -> dict:
    """The child's figures: step times, counted and resident memory, the plan, FLOPs."""
    from model.memory_plan import weight_bytes

    timed_end = args.warmup_steps + args.steps

    def timed(stamps):  # the timed steps' intervals, each from the end of the step before
        return [b - a for a, b in zip(stamps[args.warmup_steps - 1 : timed_end - 1], stamps[args.warmup_steps : timed_end],
                                      strict=True)]

    # CPU time of this process per step: on a shared machine, robust to other processes taking
    # the core (wall time is not); equal to wall time on a quiet machine with one thread.
    intervals, cpu_intervals = timed(clock.wall), timed(clock.cpu)
    weights = sum(weight_bytes(built.model).values())
    states = tensor_bytes(v for state in trainer.optimizer.state.values() for v in state.values())
    plan = built.plan
    return {
        "side": side,
        "recipe": recipe,
        "step_s": statistics.median(intervals),
        "intervals": intervals,
        "cpu_s": statistics.median(cpu_intervals),
        # Tensors counted, the rest measured: the model's parameters and buffers and the
        # optimizer's states (each storage once: what a GPU allocator holds for them) plus the
        # peak that a training step adds on top of them (gradients, activations, the loss).
        "peak_bytes": weights + states + clock.step_bytes,
        # The process's peak resident set (host memory) through the timed steps: tensors plus
        # libtorch's code, Python, mapped weight files and what glibc keeps after frees. Shown
        # beside the counted peak, for both sides alike.
        "rss_bytes": clock.rss_bytes,
        "weight_bytes": weights,
        "state_bytes": states,
        "step_bytes": clock.step_bytes,
        "plan_total": plan.total if plan else None,
        "plan_step": plan.gradients + plan.activations if plan else None,
        "flops": built.flops,
        "counts": built.counts,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "device": str(device),
        "dtype": args.dtype,
    }
