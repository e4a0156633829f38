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
This file loads the models and lays the page out; what it asks and answers is
scripts/web_demo_answers.py, its side panel scripts/web_demo_panel.py.
"""

from __future__ import annotations

import os
import sys

# Run by its path (`python scripts/x.py`) too: the repo's root, where its modules live, comes first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import startup  # noqa: F401  (first: before any library loads)

import tempfile
from dataclasses import dataclass, field
from functools import partial

import gradio as gr
from transformers import HfArgumentParser, set_seed

from constants import NUM_FRAMES
from data.dataset import read_records
from data.messages import as_llava_file
from data.records import DataError
from model.freeze import apply_freeze_policy, format_table
from run.checkpoint import check_base, load_base, load_checkpoint
from run.predict import MAX_NEW_TOKENS
from scripts.web_demo_answers import answer, pick_record
from scripts.web_demo_panel import describe, read_state, training_curves

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
