"""Fine-tune a vision-language model: vision tower -> connector -> causal LLM.

    torchrun --nproc_per_node=1 train.py                                  # the built-in demo
    torchrun --nproc_per_node=8 train.py configs/llava15_finetune.yaml    # a recipe
    python train.py configs/lora.yaml --learning_rate 1e-4 --max_steps 10  # the command line wins

Reads like a table of contents: config -> model -> freeze policy -> data -> Trainer -> delta.
"""

from __future__ import annotations

import startup  # noqa: F401  (first: before any library loads)

import dataclasses
import json
import os

from transformers import TrainerState, set_seed

from cli import parse_config, run_main
from config import save_resolved_config
from data.dataset import read_records
from data.messages import use_messages_dataset
from data.packing import packed_batch_sampler
from data.preference import use_preference_dataset
from data.sampler import modality_length_sampler
from fixtures.demo_assets import make_missing_demo_assets
from model.freeze import apply_freeze_policy, format_table
from model.memory_plan import format_plan, plan_memory
from model.packing import check_packing
from run.checkpoint import MANIFEST, load_base, load_delta
from run.environment import adapt_to_machine
from run.inputs import model_inputs
from run.predict import HeldOut, accuracy
from run.preference import DPO_PLAN_NOTE, PreferenceTrainer, preference_data
from run.run_folder import finished_step, latest_checkpoint
from run.sharding import describe_engine, is_sharded
from run.trainer import VLMTrainer


def training_data(inputs, data_args, train_args):
    """(dataset, collator, sampler) of the checked records, built by the base's own inputs object
    (data/inputs.py); the sampler None for the Trainer's own. One pass checks and tokenizes the
    records, on each node's first rank while the others wait; then every rank maps the same
    cached arrays. `--stage dpo`: preference pairs, both answers checked alike (run/preference.py)."""
    if train_args.stage == "dpo":
        dataset, collator = preference_data(inputs, data_args, train_args)
        return dataset, collator, modality_length_sampler(dataset, train_args)
    with train_args.main_process_first(desc="data pass"):
        dataset = inputs.training_set(data_args, train_args.output_dir if train_args.should_save else None)
    if data_args.packing:  # rows of whole samples (data/packing.py)
        rows = train_args.per_device_train_batch_size
        return dataset, inputs.packing_collator(data_args, rows), packed_batch_sampler(dataset, data_args.row_length, train_args)
    return dataset, inputs.collator(data_args.max_length), modality_length_sampler(dataset, train_args)


def held_out_records(data_args, inputs) -> HeldOut | None:
    """--eval_data_path's records, asked with the prompt builder training used; None without it."""
    if not data_args.eval_data_path:
        return None
    return HeldOut(read_records(data_args.eval_data_path), data_args.eval_image_folder, inputs, data_args.num_frames)


def trainer_class(train_args):
    """The stage's Trainer: the supervised loss, or DPO's against the step-0 reference."""
    return PreferenceTrainer if train_args.stage == "dpo" else VLMTrainer


def stage_memory_plan(model, data_args, train_args) -> str:
    """--dry_run's plan. max_length counts image tokens; the plan assumes every batch is padded to
    it (a released VLM's images at the processor's pixel budget: model/anatomy.py). A DPO step
    runs each pair's two answers as two rows, the LM head at their labelled tokens unfused."""
    dpo = train_args.stage == "dpo"
    # Packed, every row is full: packing_length tokens, and a block-diagonal mask [B, 1, L, L].
    plan = plan_memory(
        model,
        train_args.per_device_train_batch_size * (2 if dpo else 1),
        data_args.row_length if data_args.packing else data_args.max_length,
        gradient_checkpointing=bool(train_args.activation_checkpointing),
        packed=data_args.packing,
        fused_loss=False if dpo else None,
    )
    return format_plan(dataclasses.replace(plan, notes=(*plan.notes, DPO_PLAN_NOTE)) if dpo else plan)


def report(train_args, filename: str, text: str) -> None:
    """Print on rank 0, and keep a copy in output_dir."""
    if train_args.should_log:
        print(text)
    if train_args.should_save:
        with open(os.path.join(train_args.output_dir, filename), "w") as f:
            f.write(text + "\n")


def resolve_resume(train_args) -> str | None:
    resume = train_args.resume_from_checkpoint
    if resume in (None, "", "false", "False"):
        return None
    if resume in ("true", "True"):
        return latest_checkpoint(train_args.output_dir)  # None: nothing saved yet, start fresh
    return resume


def main(argv=None):
    model_args, data_args, train_args = parse_config(argv)
    adapt_to_machine(train_args)  # DataLoader workers within the free cores; wandb offline without a login
    resume = resolve_resume(train_args)
    finished = finished_step(resume) if resume else None
    if finished is not None and os.path.isfile(os.path.join(train_args.output_dir, MANIFEST)):
        # A job scheduler relaunching a run that already ended: nothing to do, nothing changes.
        if train_args.should_log:
            print(f"{train_args.output_dir} finished at step {finished} ({resume}): nothing to train.")
        return
    with train_args.main_process_first(desc="demo assets"):  # the demo downloads nothing: made once, if absent
        make_missing_demo_assets(model_args, data_args)
    set_seed(train_args.seed)
    if train_args.should_save:
        save_resolved_config(os.path.join(train_args.output_dir, "config.yaml"), model_args, data_args, train_args)

    # A plan needs shapes only, QLoRA's too: no weights are downloaded or held (a 7B plans on a laptop).
    plan_only = train_args.dry_run
    model = load_base(model_args, weights=not plan_only)
    if train_args.init_from and not plan_only:
        # An earlier stage's delta on the same base (fingerprint-checked), saved again with this
        # stage's, so each stage's checkpoint stands alone on the base.
        load_delta(model, train_args.init_from, new_adapters_ok=True)
    report(train_args, "freeze_table.txt", format_table(apply_freeze_policy(model, model_args)))
    if data_args.packing:  # a model that cannot keep packed samples apart is refused here
        check_packing(model, train_args.per_device_train_batch_size)
    if train_args.dry_run:
        report(train_args, "memory_plan.txt", stage_memory_plan(model, data_args, train_args))
        return

    with train_args.main_process_first(desc="data check"):  # rank 0 checks, the others read its cache
        if train_args.stage == "dpo":  # a dataset of pairs (a hub id, parquet) -> a .jsonl of pairs, once
            use_preference_dataset(data_args, train_args.output_dir)
        use_messages_dataset(data_args, train_args.output_dir)  # messages format -> LLaVA records, once
    inputs = model_inputs(model, model_args, data_args.chat_template)
    train_dataset, collator, sampler = training_data(inputs, data_args, train_args)
    held_out = held_out_records(data_args, inputs)
    evaluates = train_args.eval_strategy != "no"  # config.check_evaluation: then held_out is set
    trainer = trainer_class(train_args)(  # DPO's computes the step-0 reference log-probs here
        model=model,
        args=train_args,
        train_dataset=train_dataset,
        data_collator=collator,
        processing_class=inputs.processing_class,
        # Evaluation during training (VLMTrainer.evaluate): one seeded sample for the whole run.
        eval_dataset=held_out.sample(data_args.eval_max_samples, train_args.seed) if evaluates else None,
        parent_checkpoint=train_args.init_from,
        train_sampler=sampler,
    )
    if finished is None:
        trainer.train(resume_from_checkpoint=resume)
    else:  # ended at its last checkpoint, cut off before the final save: that save, from it
        trainer.state = TrainerState.load_from_json(os.path.join(resume, "trainer_state.json"))
        load_delta(model, resume)
    report(train_args, "engine.txt", describe_engine(trainer.model_wrapped, model))
    trainer.save_model(train_args.output_dir)
    trainer.save_state()  # trainer_state.json: the loss history the web page plots
    # The last collective is behind us. Tear gloo/NCCL down explicitly: a rank that exits while its
    # process group still runs background threads can abort ("terminate called without an active
    # exception"). Evaluation below runs on rank 0 alone and needs no group.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.state.destroy_process_group()

    if held_out and is_sharded(model):
        report(train_args, "eval_skipped.txt", "Held-out evaluation skipped: the weights are ZeRO-3/FSDP shards. "
               f"Run: python infer.py --checkpoint {train_args.output_dir} --data {data_args.eval_data_path} "
               f"--image_folder {data_args.eval_image_folder}")
    elif held_out and train_args.should_save:
        model.eval()
        results = held_out.predict(model)  # every record, not the sample evaluated during training
        with open(os.path.join(train_args.output_dir, "eval_predictions.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
        print(f"held-out accuracy: {accuracy(results):.4f} ({len(results)} records)")


if __name__ == "__main__":
    run_main(main)
