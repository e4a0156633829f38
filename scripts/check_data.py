"""Check a LLaVA .json/.jsonl file before training: the same pass train.py runs (uncached here).
Prints every problem (position, line or index, id, reason) and a summary; exits 1 when
training would refuse to start (a bad record, an unreadable file, a template that masks every
label), 0 otherwise (too-long records are dropped, duplicate ids only warned).

    python -m scripts.check_data --data_path train.jsonl --image_folder images/ \
        --llm_model lmsys/vicuna-7b-v1.5 --vision_model openai/clip-vit-large-patch14-336 \
        --chat_template configs/chat_templates/vicuna_v1.jinja --max_length 2048

    python -m scripts.check_data --data_path train.jsonl --image_folder images/ \
        --vlm_model Qwen/Qwen2.5-VL-7B-Instruct --max_pixels 1003520 --max_length 4096

(from the repository's root, as every script in scripts/ runs).

The tokenizer and image-token count come from the two bases (the tower is built on the meta
device: no weights are read), or from a released VLM's processor (its template, and its count
of tokens per image size), exactly as train.py would use them.
"""

import os
import sys

# Run by its path (`python scripts/x.py`) too: the repo's root, where its modules live, comes first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import startup  # noqa: F401  (first: before any library loads)

from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModel, HfArgumentParser

from config import DataArguments, ModelArguments
from data.processor_prompt import ImageTokenCount, ProcessorTemplate
from data.validate import validate_data_file
from model.build import load_tokenizer_and_image_processor
from model.connectors import CONNECTORS
from model.released import load_released_processor
from model.vision import VisionTower
from model.vlm import IMAGE_TOKEN_INDEX


@dataclass
class CheckArguments:
    num_workers: int | None = field(
        default=None, metadata={"help": "Processes of the pass (and threads decoding images); default: every core."}
    )


def num_image_tokens(args: ModelArguments) -> int:
    """Image tokens per image of the model these arguments build, without reading weights."""
    config = AutoConfig.from_pretrained(args.vision_model, revision=args.vision_revision)
    vision_config = getattr(config, "vision_config", config)
    with torch.device("meta"):
        encoder = AutoModel.from_config(vision_config)
        tower = VisionTower(encoder, args.vision_feature_layer, args.vision_feature_select_strategy)
        connector = CONNECTORS[args.connector](tower.hidden_size, 8, tower.num_tokens, args)
    return connector.num_tokens


def how_records_are_read(model_args: ModelArguments, data_args: DataArguments):
    """(tokenizer, image tokens per image, image token id, tokens per image size or None), as
    train.py's data check reads records: a released VLM through its processor (each image as
    many tokens as the processor makes of its size), a composed base with a fixed count."""
    if model_args.vlm_model:
        processor = load_released_processor(model_args, data_args.chat_template)
        return ProcessorTemplate(processor), 1, processor.image_token_id, ImageTokenCount(processor)
    tokenizer, _ = load_tokenizer_and_image_processor(model_args, data_args.chat_template)
    return tokenizer, num_image_tokens(model_args), IMAGE_TOKEN_INDEX, None


def main(argv=None) -> int:
    parser = HfArgumentParser((ModelArguments, DataArguments, CheckArguments), allow_abbrev=False)
    model_args, data_args, check_args = parser.parse_args_into_dataclasses(args=argv)
    if data_args.data_path is None:
        parser.error("--data_path is required")
    tokenizer, image_count, image_token, image_tokens = how_records_are_read(model_args, data_args)
    report = validate_data_file(
        data_args.data_path, tokenizer, image_count, image_token, data_args.max_length, data_args.image_folder,
        check_args.num_workers, data_args.num_frames, image_tokens=image_tokens,
    )
    for problem in report.problems:
        print(f"{problem.severity}: {problem.kind}: {problem}")
    print(report.summary())
    return 1 if report.refuses_training else 0


if __name__ == "__main__":
    from cli import run_main

    sys.exit(run_main(main))
