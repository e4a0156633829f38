"""bench/training.py --plan_only: each recipe's `--dry_run` memory plan for a shape's batch, built
on the meta device from the shape's configs alone (no weights, no training): a GPU shape planned on
a laptop.
"""

from __future__ import annotations

import os

from bench.arguments import BenchArguments
from bench.native_shapes import native_config, native_processor, native_samples
from bench.shapes import image_tokens_per_image, is_native, supervised_positions, work_dir, write_configs
from bench.sides import model_args_of
from constants import IGNORE_INDEX

MIB = 2**20


def print_plans(args: BenchArguments, shape_name: str, shape: dict) -> None:
    """Each recipe's plan for the shape's batch, built on the meta device from its configs alone."""
    from model.build import build_model
    from model.freeze import apply_freeze_policy
    from model.memory_plan import plan_memory

    configs = os.path.join(work_dir(args.workdir), f"{shape_name}-configs")
    image_tokens = image_tokens_per_image(shape)
    if is_native(shape):  # config.json and the processor, which makes the batch: its answer is labelled
        processor = native_processor(shape)
        native_config(shape, processor.tokenizer).save_pretrained(configs)
        processor.save_pretrained(configs)
        batch = native_samples(configs, shape, args.batch_size, args.seq_len, args.images, shape["llm"]["vocab_size"])
        supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    else:
        write_configs(configs, shape)
        supervised = supervised_positions(args.batch_size, args.seq_len, args.images, image_tokens)
    print(f"plan: shape {shape_name}, batch {args.batch_size} x {args.seq_len} tokens, {args.images} image(s) of "
          f"{image_tokens} tokens/sample, {supervised} labelled positions, {args.dtype}, AdamW, MiB per device")
    print(f"{'recipe':<11} {'weights':>9} {'grads':>9} {'adamw':>9} {'act_off':>9} {'act_on':>9} {'total_off':>9} {'total_on':>9}")
    for recipe in args.recipes:
        model_args = model_args_of(args, configs, recipe, shape)
        model = build_model(model_args, weights=False)  # a released VLM when model_args.vlm_model is set
        apply_freeze_policy(model, model_args)
        plan = plan_memory(model, args.batch_size, args.seq_len, False, images_per_sample=args.images,
                           supervised_tokens=supervised, padded=False)
        fixed = plan.weights_total + plan.gradients + plan.optimizer
        print(f"{recipe:<11} " + " ".join(
            f"{value / MIB:>9.1f}" for value in (plan.weights_total, plan.gradients, plan.optimizer,
                                                 plan.activations_no_ckpt, plan.activations_ckpt)
        ) + f" {(fixed + plan.activations_no_ckpt) / MIB:>9.1f} {(fixed + plan.activations_ckpt) / MIB:>9.1f}")
