"""The web page's side panel: what the checkpoint is (base, fingerprint, connector, LoRA, the
freeze table) and how it trained (the loss curve, a DPO run's rewards and the held-out accuracy curve from its
trainer_state.json). Imported by scripts/web_demo.py; not run on its own."""

from __future__ import annotations

import json
import os

import gradio as gr
import pandas as pd


def read_state(ckpt_dir: str) -> dict:
    """The checkpoint's trainer_state.json ({} when it has none)."""
    path = os.path.join(ckpt_dir, "trainer_state.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _history(state: dict, series: dict[str, str], column: str) -> pd.DataFrame | None:
    """(step, column, series) rows of the log_history entries holding one of `series`' keys."""
    rows = [(e["step"], e[key], name) for e in state.get("log_history", [])
            for key, name in series.items() if key in e]
    return pd.DataFrame(rows, columns=["step", column, "series"]) if rows else None


def loss_history(state: dict) -> pd.DataFrame | None:
    return _history(state, {"loss": "train", "eval_loss": "eval"}, "loss")


def accuracy_history(state: dict) -> pd.DataFrame | None:
    """The held-out exact-match accuracy train.py logged every --eval_steps (VLMTrainer.evaluate)."""
    return _history(state, {"eval_accuracy": "held-out"}, "accuracy")


def reward_history(state: dict) -> pd.DataFrame | None:
    """A --stage dpo run's implicit rewards (run/preference.py), logged with each loss."""
    return _history(state, {f"rewards/{k}": k for k in ("chosen", "rejected", "margins")}, "reward")


def no_loss_note(state: dict) -> str:
    """Why a checkpoint has no loss curve: the file missing, or in it but holding no loss."""
    if not state:
        return "No loss curve: there is no trainer_state.json in this checkpoint (a run before train.py saved it)."
    steps, every = state.get("global_step", 0), state.get("logging_steps")
    why = (f"the run's {steps} steps were fewer than logging_steps={every}" if every and steps < every
           else f"logging_steps={every}, {steps} steps: was --logging_strategy no?")
    return f"No loss curve: trainer_state.json holds no logged loss ({why})."


def _curve(frame: pd.DataFrame, y: str, title: str, elem_id: str, **options) -> None:
    """A line, or a dot while there is one point (a line of one point draws nothing)."""
    plot = gr.LinePlot if len(frame) > 1 else gr.ScatterPlot
    two_series = frame["series"].nunique() > 1  # a legend only for train + eval
    plot(frame, x="step", y=y, color="series" if two_series else None, title=title, height=260,
         elem_id=elem_id, **options)


def training_curves(state: dict) -> None:
    """The side panel's curves, inside build_page's Blocks: the loss, the held-out accuracy below
    it when the run evaluated during training, and a sentence for a missing loss curve."""
    losses, accuracies = loss_history(state), accuracy_history(state)
    if losses is not None:
        _curve(losses, "loss", "loss", "loss-plot")
    else:
        gr.Markdown(no_loss_note(state), elem_id="loss-note")
    rewards = reward_history(state)
    if rewards is not None:  # preference tuning: the rewards beside the loss, the pairs won in the title
        last = next(e for e in reversed(state["log_history"]) if "rewards/accuracies" in e)
        title = f"DPO rewards (chosen wins {last['rewards/accuracies']:.2f} of pairs at step {last['step']})"
        _curve(rewards, "reward", title, "reward-plot")
    if accuracies is not None:
        last = next(e for e in reversed(state["log_history"]) if "eval_accuracy" in e)
        records = f" ({last['eval_samples']} records)" if "eval_samples" in last else ""
        title = f"held-out accuracy: {last['eval_accuracy']:.3f} at step {last['step']}{records}"
        _curve(accuracies, "accuracy", title, "accuracy-plot", y_lim=[0, 1], y_title="exact match")


def describe(models: dict, state: dict) -> str:
    """The checkpoint panel's text (Markdown)."""
    manifest, args = models["manifest"], models["finetuned"].build_args
    base, fp = manifest["base"], manifest["base_fingerprint"]
    lora = (f"r {args.lora_r}, alpha {args.lora_alpha}, dropout {args.lora_dropout}, on {args.lora_target}"
            f"{', frozen' if args.freeze_lora else ''}, modules {args.lora_modules or 'every linear'}"
            if args.lora_enable else "off")
    steps = f"{state['global_step']} of {state['max_steps']}" if state else "unknown (no trainer_state.json)"
    if "vlm" in base:  # a released VLM
        parts = [f"- **released VLM** `{base['vlm']}` @ {base['vlm_revision'] or 'default'}, fingerprints "
                 + ", ".join(f"{component} `{value}`" for component, value in fp.items()), f"- **LoRA** {lora}"]
    else:
        parts = [
            f"- **vision tower** `{base['vision']}` @ {base['vision_revision'] or 'default'}, fingerprint `{fp['vision']}`",
            f"- **LLM** `{base['llm']}` @ {base['llm_revision'] or 'default'}, fingerprint `{fp['llm']}`",
            f"- **connector** `{args.connector}`; **LoRA** {lora}",
        ]
    return "\n".join([
        *parts,
        f"- **weights** {args.dtype}" + (f", QLoRA {args.bits}-bit {args.quant_type}" if args.bits < 16 else ""),
        f"- **training steps** {steps}" + (f"; started from `{manifest['parent']}`" if manifest.get("parent") else ""),
        "", "**What trained** (the freeze table)", "```text", models["freeze_table"], "```",
    ])
