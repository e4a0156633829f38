"""Export a checkpoint (base + delta) as one standalone model folder, LoRA folded in.

    python -m scripts.export_hf --checkpoint outputs/demo --out outputs/demo-hf

(from the repository's root, as every script in scripts/ runs).

An mlp2x_gelu connector on a CLIP/SigLIP tower and a Llama/Qwen2/Mistral LLM is exactly
transformers' Llava, so that becomes a Llava folder any Llava client opens:

    model = LlavaForConditionalGeneration.from_pretrained("outputs/demo-hf")
    processor = AutoProcessor.from_pretrained("outputs/demo-hf")

Anything else (the resampler has no transformers class) becomes a merged checkpoint of this
repo: the merged towers as `vision/` and `llm/` inside the folder, plus a delta holding the
connector whose manifest names them, so no base is needed and the folder can be moved:

    python infer.py --checkpoint outputs/demo-hf --image photo.png --prompt "What is shown?"

A checkpoint of a released VLM (`--vlm_model`) becomes that model's own folder, LoRA merged and
the delta in place, with its processor and the chat template it trained with:

    model = AutoModelForImageTextToText.from_pretrained("outputs/qwen-hf")
    processor = AutoProcessor.from_pretrained("outputs/qwen-hf")

Both model folders hold their weights under the names the family's released checkpoints have on
the hub (model/hub_layout.py), so that serving engines load them: vLLM serves them (docs/vllm.md).

A QLoRA checkpoint is merged into the base loaded unquantized, as usual for QLoRA.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys

# Run by its path (`python scripts/x.py`) too: the repo's root, where its modules live, comes first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import startup  # noqa: F401  (first: before any library loads)

from dataclasses import dataclass, field

import torch
from peft import PeftModel
from transformers import (
    HfArgumentParser,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from model.freeze import apply_freeze_policy
from model.hub_layout import write_hub_layout
from model.vision import load_vision_encoder
from run.checkpoint import (
    load_base,
    load_checkpoint,
    save_checkpoint,
)
from run.predict import stop_token_ids

LLAVA_TOWERS = ("clip_vision_model", "siglip_vision_model")
LLAVA_LLMS = ("llama", "qwen2", "mistral")
IMAGE_TOKEN = "<image>"


@dataclass
class ExportArguments:
    checkpoint: str = field(metadata={"help": "A checkpoint folder written by train.py."})
    out: str = field(metadata={"help": "The folder to write the standalone model to."})
    base_vision: str | None = field(default=None, metadata={"help": "Override the base tower."})
    base_llm: str | None = field(default=None, metadata={"help": "Override the base LLM."})


def stopping_generation_config(model, tokenizer):
    """The base's generation config with infer.py's stop ids as its eos ids (`stop_token_ids`: the
    config's own, the tokenizer's eos, the turn end training supervised), so that the exported
    model stops on its own where infer.py stops, in any client that reads generation_config.json."""
    config = copy.deepcopy(model.base_generation_config())
    config.eos_token_id = stop_token_ids(model, tokenizer)
    return config


def export_released(model, processor, out: str) -> None:
    """The released model with its LoRA merged and its delta loaded, saved as transformers saves
    it, beside its processor (which carries the chat template the checkpoint trained with)."""
    generation_config = stopping_generation_config(model, processor)
    vlm = model.vlm.merge_and_unload() if isinstance(model.vlm, PeftModel) else model.vlm
    vlm.generation_config = generation_config
    vlm.save_pretrained(out)
    write_hub_layout(out)  # the keys its released checkpoints have, which serving engines read
    processor.save_pretrained(out)


def merge_lora(model) -> None:
    """Fold every LoRA adapter into its base weight: the export holds plain weights only."""
    if isinstance(model.llm, PeftModel):
        model.llm = model.llm.merge_and_unload()
    if isinstance(model.vision.encoder, PeftModel):
        model.vision.encoder = model.vision.encoder.merge_and_unload()


def full_vision_tower(model):
    """The whole base tower with our (trained, merged) weights in it. Our VisionTower dropped
    the layers after the feature layer and the pooling head; a standalone folder needs them."""
    args = model.build_args
    tower = load_vision_encoder(args.vision_model, revision=args.vision_revision, dtype=getattr(torch, args.dtype))
    result = tower.load_state_dict(model.vision.encoder.state_dict(), strict=False)
    # Every tensor we hold has its place in the full tower; only what we cut off keeps the base's.
    assert not result.unexpected_keys, f"tower tensors with no place in the base: {result.unexpected_keys}"
    return tower


def image_token_id(model, tokenizer) -> int:
    """Llava marks image positions with a real token, so "<image>" must be exactly one token."""
    if len(tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)) != 1:
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
        # Its embedding is never read: image features overwrite those positions.
        model.llm.resize_token_embeddings(len(tokenizer))
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def export_llava(model, tokenizer, image_processor, out: str) -> None:
    args = model.build_args
    tower = full_vision_tower(model)
    token_id = image_token_id(model, tokenizer)
    # Llava's "default" always drops the first token; a tower without CLS (SigLIP) needs "full".
    strategy = "default" if model.vision.drop_cls else "full"
    config = LlavaConfig(
        vision_config=tower.config,
        text_config=model.llm.config,
        image_token_index=token_id,
        image_seq_length=model.num_image_tokens,
        projector_hidden_act="gelu",  # nn.GELU(), exact: the MLPProjector's activation
        vision_feature_layer=args.vision_feature_layer,
        vision_feature_select_strategy=strategy,
    )
    llava = LlavaForConditionalGeneration(config).to(getattr(torch, args.dtype))
    # Strict loads, part by part: the MLPProjector's names are Llava's (linear_1, linear_2).
    llava.model.vision_tower.load_state_dict(tower.state_dict())
    llava.model.multi_modal_projector.load_state_dict(model.connector.state_dict())
    llava.model.language_model.load_state_dict(model.llm.get_decoder().state_dict())
    llava.lm_head.load_state_dict(model.llm.get_output_embeddings().state_dict())
    llava.generation_config = stopping_generation_config(model, tokenizer)
    llava.save_pretrained(out)
    write_hub_layout(out)  # llava-hf's keys (vision_tower.vision_model.*), which serving engines read

    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=tower.config.patch_size,
        vision_feature_select_strategy=strategy,
        # The processor counts patches (+ CLS) and subtracts one for "default": CLIP 1, SigLIP 0.
        num_additional_image_tokens=int(model.vision.has_cls),
        chat_template=tokenizer.chat_template,
        image_token=IMAGE_TOKEN,
    )
    processor.save_pretrained(out)


def export_merged(model, tokenizer, image_processor, out: str, source: str) -> None:
    """The merged towers as plain HF folders inside `out`, and a delta holding the connector
    whose manifest names them (and fingerprints the merged weights, not the old base)."""
    paths = {"vision": os.path.join(out, "vision"), "llm": os.path.join(out, "llm")}
    full_vision_tower(model).save_pretrained(paths["vision"])
    image_processor.save_pretrained(paths["vision"])
    model.llm.generation_config = stopping_generation_config(model, tokenizer)  # infer.py reads it back
    model.llm.save_pretrained(paths["llm"])
    tokenizer.save_pretrained(paths["llm"])

    # The merged model's recipe: towers frozen (their training is in their weights now), no
    # LoRA, connector trainable so that it is the delta.
    args = dataclasses.replace(
        model.build_args,
        vision_model=paths["vision"], vision_revision=None, llm_model=paths["llm"], llm_revision=None,
        freeze_vit=True, freeze_llm=True, freeze_qformer=False, lora_enable=False, freeze_lora=False,
        trainable_regex=None, frozen_regex=None, bits=16,
    )
    merged = load_base(args)
    merged.connector.load_state_dict(model.connector.state_dict())
    apply_freeze_policy(merged, args)
    save_checkpoint(merged, out, tokenizer, parent=source)


def main(argv=None):
    (args,) = HfArgumentParser(ExportArguments, allow_abbrev=False).parse_args_into_dataclasses(args=argv)
    if os.path.abspath(args.out) == os.path.abspath(args.checkpoint):
        raise SystemExit("--out must be a new folder: exporting over the checkpoint would replace it.")
    # bits=16: LoRA merges into unquantized weights, whatever the checkpoint trained on.
    model, inputs, _ = load_checkpoint(args.checkpoint, args.base_vision, args.base_llm, bits=16)
    if model.build_args.vlm_model:
        export_released(model, processor=inputs.processor, out=args.out)
        print(f"Wrote {args.out}: AutoModelForImageTextToText + AutoProcessor open it.")
        return
    merge_lora(model)
    is_llava = (
        model.connector.exports_as_llava
        and model.vision.encoder.config.model_type in LLAVA_TOWERS
        and model.llm.config.model_type in LLAVA_LLMS
    )
    if is_llava:
        export_llava(model, inputs.tokenizer, inputs.image_processor, args.out)
        print(f"Wrote a transformers Llava folder to {args.out} (LlavaForConditionalGeneration + LlavaProcessor).")
    else:
        export_merged(model, inputs.tokenizer, inputs.image_processor, args.out, args.checkpoint)
        print(f"Wrote a merged checkpoint to {args.out}: python infer.py --checkpoint {args.out} ...")


if __name__ == "__main__":
    from cli import run_main

    run_main(main)
