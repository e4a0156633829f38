"""The inputs object of a built model (data/inputs.py): the one place that picks a base's kind to
build it, for train.py, infer.py (through run.checkpoint), evaluation and the web page."""

from __future__ import annotations

from data.inputs import ComposedInputs, ModelInputs, ReleasedInputs
from model.build import load_tokenizer_and_image_processor
from model.released import load_released_processor


def model_inputs(model, model_args, chat_template_path: str | None = None) -> ModelInputs:
    """`model`'s inputs as `model_args` built it; `chat_template_path`: a .jinja that replaces the
    tokenizer's or processor's chat template (a checkpoint's saved one, or --chat_template)."""
    if model_args.vlm_model:
        processor = load_released_processor(model_args, chat_template_path)
        return ReleasedInputs(processor, model.image_token_index, model.prefix_lm)
    tokenizer, image_processor = load_tokenizer_and_image_processor(model_args, chat_template_path)
    return ComposedInputs(tokenizer, image_processor, model.num_image_tokens, model.image_token_index)
