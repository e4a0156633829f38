"""A web page that shows what fine-tuning did: one question, two answers side by side.

    python -m scripts.web_demo --checkpoint outputs/demo
    python -m scripts.web_demo --checkpoint outputs/demo --data outputs/demo-data/eval.json \
        --image_folder outputs/demo-data

from the repository's root (every script in scripts/ runs as a module).

**fine-tuned** is the checkpoint as infer.py loads it (`load_checkpoint`, the one loader) and
answers with the same `generate_answers`, so it prints what
`python infer.py --checkpoint DIR --image X --prompt Q` prints: a typed question becomes messages
by the same `question_messages`, and a picked --data record's question, left unchanged, is asked
exactly as `infer.py --data` asks it (`first_question`, a system turn kept). **base** is the
manifest's base built by the same `build_model` with no delta, its connector seeded as train.py
seeded it, so it answers as the run did at step 0. A side panel shows the checkpoint: base and
fingerprint, connector, freeze table, LoRA settings, steps, the loss curve and the held-out
accuracy logged during training (--eval_steps).

Listens on 127.0.0.1 (`--host 0.0.0.0` to open it to the network), never shares a public link,
never runs remote code. A checkpoint the loader refuses still opens the page, showing why.
"""

from __future__ import annotations

import os
import sys

# Run by its path (`python scripts/x.py`) too: the repo's root, where its modules live, comes first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import startup  # noqa: F401  (first: before any library loads)

import json
import tempfile
from dataclasses import dataclass, field
from functools import partial

import gradio as gr
import pandas as pd
from PIL import Image
from transformers import HfArgumentParser, set_seed

from constants import NUM_FRAMES
from data.dataset import read_records
from data.media import load_image, record_media
from data.messages import as_llava_file
from data.prompt import IMAGE_MARKER, VIDEO_MARKER, MarkerMismatch, question_messages
from data.records import DataError
from errors import UserError
from model.freeze import apply_freeze_policy, format_table
from run.checkpoint import check_base, load_base, load_checkpoint
from run.predict import MAX_NEW_TOKENS, first_question, generate_answers

MAX_PIXELS = 4096 * 4096  # a page anyone can post to gets a tighter cap than PIL's bomb limit
MAX_UPLOAD = "20mb"
# System fonts: the default theme fetches Google Fonts, and the page must load nothing remote.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
CSS = "#images .grid-container { padding-top: 2.5rem; }"  # thumbnails below the label, not under it


@dataclass
class WebDemoArguments:
    checkpoint: str = field(metadata={"help": "A checkpoint folder written by train.py."})
    host: str = field(default="127.0.0.1", metadata={"help": "0.0.0.0 opens the page to the network."})
    port: int = field(default=7860)
    data: str | None = field(default=None, metadata={"help": "LLaVA .json/.jsonl whose records the page offers."})
    image_folder: str | None = field(default=None, metadata={"help": "Root of --data's image paths."})
    num_frames: int = field(default=NUM_FRAMES, metadata={"help": "Frames sampled from a --data video record."})
    compare_base: bool = field(default=True, metadata={"help": "Load the base a second time (twice the memory)."})


class PageError(UserError):
    """Bad input, said in a sentence the page shows instead of a traceback."""


def build_base(finetuned, manifest: dict):
    """The base alone, built from the loader's own resolved ModelArguments (nothing here reads
    the manifest's settings a second way). train.py seeds, then builds: the run's seed, which the
    manifest records, gives a composed base's connector its step 0 (an --init_from stage started
    from its parent's delta instead)."""
    set_seed(manifest.get("seed") or 0)
    base = load_base(finetuned.build_args)
    check_base(base, manifest)
    apply_freeze_policy(base, base.build_args)  # as the loader does: same dtypes as the fine-tuned
    base.requires_grad_(False)
    return base.eval()


def load_models(args: WebDemoArguments) -> dict:
    """{"finetuned", "base", "inputs", "manifest", "freeze_table"}, or
    {"error": the loader's message}: a refused checkpoint still gets a page that says why."""
    try:
        model, inputs, manifest = load_checkpoint(args.checkpoint)
        # The recipe's table, by the function train.py printed it with (the loader applied it too).
        freeze_table = format_table(apply_freeze_policy(model, model.build_args))
        model.requires_grad_(False)
        base = build_base(model, manifest) if args.compare_base else None
    except (OSError, ValueError) as error:  # every UserError (a ValueError); a base path or hub id not found
        print(f"cannot load {args.checkpoint}: {error}", file=sys.stderr)
        return {"error": f"Cannot load checkpoint `{args.checkpoint}`: {error}"}
    return {"finetuned": model, "base": base, "inputs": inputs, "manifest": manifest, "freeze_table": freeze_table}


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


def read_images(paths: list[str]) -> list[Image.Image]:
    images = []
    for path in paths:
        name = os.path.basename(path)
        try:
            with Image.open(path) as probe:  # the header only: refuse huge images before decoding
                width, height = probe.size
            if width * height > MAX_PIXELS:
                raise PageError(f"{name} is {width}x{height}: more than {MAX_PIXELS:,} pixels. Resize it.")
            images.append(load_image(path))
        except (OSError, DataError, Image.DecompressionBombError) as error:  # unreadable, truncated
            raise PageError(f"{name} cannot be read as an image ({error}).") from error
    return images


def build_prompt(question: str, images: list) -> list[dict]:
    """A typed question -> messages, by infer.py's --prompt rule (`question_messages`): markers
    where the question puts them, else one per image first; a `<video>` marker makes the images
    a video's frames, in time order."""
    try:
        return question_messages(question, len(images), video=VIDEO_MARKER in question)
    except MarkerMismatch as error:
        raise PageError(
            f"The question has {error.markers} `{IMAGE_MARKER}` marker(s) for {error.num_images} image(s): upload "
            "one image per marker, or remove the markers and the images all go before the question."
        ) from error


def _same_text(a: str, b: str) -> bool:
    return a.replace("\r\n", "\n") == b.replace("\r\n", "\n")  # a browser's textarea sends \n


def prompt_messages(question: str, images: list, picked: dict | None) -> list[dict]:
    """The messages asked. The picked record's question, unchanged: exactly `first_question`'s
    messages (a system turn included), as infer.py --data asks it; anything typed or edited:
    `build_prompt`."""
    if not (picked and _same_text(question, picked["question"])):
        return build_prompt(question, images)
    markers = sum(m["content"].count(IMAGE_MARKER) for m in picked["messages"])
    if markers != len(images):
        raise PageError(
            f"The record's question has {markers} `{IMAGE_MARKER}` marker(s) for {len(images)} image(s): "
            "pick the record again to restore its images, or edit the question."
        )
    return picked["messages"]


def answer(models: dict, gallery, question: str, max_new_tokens: int, mode: str, temperature: float,
           picked: dict | None = None):
    """Gradio handler -> (fine-tuned answer, base answer, status Markdown). `picked`: the
    picked record's question and messages (`pick_record`), or None."""
    try:
        if not (question or "").strip():
            raise PageError("Type a question first.")
        images = read_images([item[0] for item in gallery or []])
        prompt = [(prompt_messages(question, images, picked), images)]
    except PageError as error:
        return "", "", f"**Error:** {error}"
    sampling = {"do_sample": mode == "sample", "temperature": temperature}
    answers = [
        generate_answers(m, models["inputs"], prompt, int(max_new_tokens), **sampling)[0]
        if m is not None else "(not loaded: --compare_base false)"
        for m in (models["finetuned"], models["base"])
    ]
    notes = [] if images else ["No image: asked as a text-only question."]
    notes += [f"The {name} model answered nothing (it ended the answer at once)."
              for name, text in zip(("fine-tuned", "base"), answers, strict=True) if not text]
    return answers[0], answers[1], " ".join(notes)


def pick_record(records: list[dict], image_folder: str | None, num_frames: int, index):
    """A --data record -> (its first question's images or frames, that question, expected answer,
    status, picked). The question is `first_question`'s, the rule infer.py --data and train.py's
    evaluation ask by; `picked` keeps its messages (a system turn included) for `answer`."""
    if index is None:
        return gr.skip(), gr.skip(), gr.skip(), "", gr.skip()
    record = records[int(index)]
    try:
        messages, images, expected = first_question(record, image_folder, num_frames)
        # Paths where the media are files (Gradio serves them), a video file's decoded frames.
        media = record_media(record, image_folder, num_frames)[: len(images)]
    except DataError as error:
        return None, "", "", f"**Error:** this record cannot be read: {error}", None
    question = next((m["content"] for m in messages if m["role"] == "user"), "")
    return media, question, expected or "", "", {"question": question, "messages": messages}


def _record_label(record: dict) -> str:
    first_turn = " ".join(record["conversations"][0]["value"].split()) if record["conversations"] else ""
    return f"{record['id']}: {first_turn[:70]}"


def build_page(models: dict, args: WebDemoArguments, records: list[dict] | None = None) -> gr.Blocks:
    failed = "error" in models
    records = None if failed else records
    with gr.Blocks(title="vlm-finetune: what fine-tuning did", analytics_enabled=False) as page:
        gr.Markdown(f"# What fine-tuning did\nCheckpoint `{args.checkpoint}`: the same question to the "
                    "fine-tuned model and to its base.")
        status = gr.Markdown(f"**Error:** {models['error']}" if failed else "", elem_id="status")
        with gr.Row():
            with gr.Column(scale=3):
                if records:
                    choices = [(_record_label(r), str(i)) for i, r in enumerate(records)]
                    picker = gr.Dropdown(choices, value=None, label=f"A record of {os.path.basename(args.data)}",
                                         elem_id="picker")
                gallery = gr.Gallery(label="Images (in <image> order)", type="filepath", file_types=["image"], format="png",
                                     interactive=True, columns=4, height=240, preview=False,
                                     fit_columns=False, object_fit="contain", elem_id="images")
                question = gr.Textbox(label="Question", lines=2, elem_id="question",
                                      placeholder="What color are the shapes?  (<image> marks where an image goes)")
                expected = gr.Textbox(label="Expected answer (from the data)", interactive=False,
                                      visible=bool(records), elem_id="expected")
                with gr.Accordion("Generation settings", open=False):
                    max_new_tokens = gr.Slider(1, 512, value=MAX_NEW_TOKENS, step=1,
                                               label="max new tokens (infer.py's default)")
                    mode = gr.Radio(["greedy", "sample"], value="greedy", label="decoding")
                    temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="temperature (sample only)")
                ask = gr.Button("Ask both", variant="primary", interactive=not failed, elem_id="ask")
                with gr.Row():
                    finetuned_box = gr.Textbox(label="fine-tuned", interactive=False, lines=3, elem_id="finetuned")
                    base_box = gr.Textbox(label="base (no delta)", interactive=False, lines=3, elem_id="base")
            with gr.Column(scale=2):
                gr.Markdown("## The checkpoint")
                if failed:
                    gr.Markdown("Not loaded: see the error above.")
                else:
                    state = read_state(args.checkpoint)
                    gr.Markdown(describe(models, state), elem_id="checkpoint-info")
                    training_curves(state)
        if not failed:
            picked = gr.State(None)  # the picked record's question and first_question messages
            inputs = [gallery, question, max_new_tokens, mode, temperature, picked]
            ask.click(partial(answer, models), inputs, [finetuned_box, base_box, status])
            if records:  # an upload replaces the record's images: its expected answer no longer applies
                gallery.upload(lambda: "", None, expected)
                picker.input(partial(pick_record, records, args.image_folder, args.num_frames),
                             picker, [gallery, question, expected, status, picked])
    return page


def main(argv=None):
    (args,) = HfArgumentParser(WebDemoArguments, allow_abbrev=False).parse_args_into_dataclasses(args=argv)
    models = load_models(args)
    records = None
    if args.data:
        try:
            # A messages-format dataset is converted (its images written) for the server's life.
            args.data, args.image_folder = as_llava_file(args.data, args.image_folder, tempfile.mkdtemp(), "test")
            records = read_records(args.data)
        except (DataError, OSError) as error:  # a command-line mistake: said at once, not in the page
            raise SystemExit(f"--data {args.data}: {error}") from error
    page = build_page(models, args, records)
    # The picker shows --data's images: Gradio serves only folders it is told about.
    allowed = [os.path.abspath(args.image_folder or ".")] if records else None
    # show_error=False: an unexpected exception reaches the page as "Error", never as its text.
    # ssr_mode=False: no Node server beside Python. Gradio queues each event one at a time, so
    # the two models never generate for two visitors at once.
    page.launch(server_name=args.host, server_port=args.port, share=False, show_error=False,
                max_file_size=MAX_UPLOAD, allowed_paths=allowed, ssr_mode=False, theme=THEME, css=CSS)


if __name__ == "__main__":
    from cli import run_main

    run_main(main)
