"""scripts/export_hf.py: a Llava folder that transformers runs to the same logits and tokens as
our model, and a merged checkpoint that infer.py opens without the base."""

from __future__ import annotations

import json
import os
import random
import runpy
import shutil
import sys

import pytest
import torch
from helpers import tiny_model_args
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

import infer
from config import ModelArguments
from data.processor_prompt import encode_batch
from data.prompt import tokenize_prompt
from fixtures.synthetic import make_image
from fixtures.tiny_vlms import FAMILIES, make_tiny_vlm
from model.build import load_tokenizer_and_image_processor
from model.freeze import apply_freeze_policy
from model.hub_layout import write_hub_layout
from model.released import load_released_processor
from model.vision import load_vision_encoder
from run.checkpoint import MANIFEST, load_base, load_checkpoint, save_checkpoint
from run.predict import generate_answers
from scripts.export_hf import main as export_main

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = "What color are the shapes?"
LORA = dict(lora_enable=True, lora_r=4, lora_alpha=8)


def perturbed_checkpoint(args, path: str) -> str:
    """No training needed: every trainable tensor (LoRA B included, which starts at zero) is
    moved off its initial value, so the export differs from the base wherever a delta exists."""
    model = load_base(args)
    apply_freeze_policy(model, args)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g) * 0.1)
    save_checkpoint(model, path, load_tokenizer_and_image_processor(args)[0])
    return path


def image():
    return make_image(random.Random(0))[0]


def llava_inputs(out: str):
    """The prompt as a transformers client builds it: typed content parts, LlavaProcessor."""
    processor = LlavaProcessor.from_pretrained(out)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=image(), text=text, return_tensors="pt")


def our_input_ids(model, tokenizer) -> torch.Tensor:
    messages = [{"role": "user", "content": "<image>" + QUESTION}]
    return torch.tensor([tokenize_prompt(tokenizer, messages, model.num_image_tokens, model.image_token_index)])


def assert_llava_matches(ckpt: str, out: str, base_vision: str) -> None:
    ours, inputs, _ = load_checkpoint(ckpt)
    tokenizer = inputs.tokenizer
    llava, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    llava.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert write_hub_layout(out) == {}, "the export is already in llava-hf's layout (vision_tower.vision_model.*)"
    inputs = llava_inputs(out)

    # One "<image>" expands to the tower's 64 patch tokens, and the whole prompt is token for
    # token the one our prompt builder makes (image positions aside).
    image_id = llava.config.image_token_id
    assert int((inputs.input_ids == image_id).sum()) == ours.num_image_tokens == 64
    ids = our_input_ids(ours, tokenizer)
    assert torch.equal(inputs.input_ids, ids.masked_fill(ids == ours.image_token_index, image_id))

    with torch.no_grad():
        expected = ours(input_ids=ids, pixel_values=inputs.pixel_values).logits
        actual = llava(**inputs).logits
    vocab = expected.shape[-1]  # the export may have added "<image>" at the end of the vocabulary
    torch.testing.assert_close(actual[..., :vocab], expected, atol=1e-4, rtol=0)

    greedy = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    our_tokens = ours.generate(input_ids=ids, pixel_values=inputs.pixel_values, **greedy)
    llava_tokens = llava.generate(**inputs, **greedy)[:, inputs.input_ids.shape[1] :]
    assert torch.equal(llava_tokens, our_tokens)

    # The exported tower is the whole base tower (ours was cut after the feature layer), with
    # the merged LoRA in the layers we ran and the base's weights in the layers we cut.
    base = load_vision_encoder(base_vision).state_dict()
    exported = llava.model.vision_tower.state_dict()
    assert exported.keys() == base.keys()
    last = len(llava.model.vision_tower.encoder.layers) - 1
    cut = [k for k in base if f"layers.{last}." in k or "post_layernorm" in k or k.startswith("head.")]
    assert cut and all(torch.equal(exported[k], base[k]) for k in cut)
    assert not torch.equal(exported["encoder.layers.0.self_attn.q_proj.weight"], base["encoder.layers.0.self_attn.q_proj.weight"])


def test_llava_export_of_clip_lora_matches_our_model(tiny_base, tmp_path, monkeypatch):
    """LoRA on both towers (merged into each), mlp2x_gelu, through the documented command."""
    ckpt = perturbed_checkpoint(tiny_model_args(tiny_base, **LORA, lora_target="both"), str(tmp_path / "ckpt"))
    out = str(tmp_path / "hf")
    # The script's own `__main__` block and argument parsing, in this process (a subprocess
    # would pay ~10 s of imports again).
    monkeypatch.setattr(sys, "argv", ["export_hf.py", "--checkpoint", ckpt, "--out", out])
    monkeypatch.delitem(sys.modules, "scripts.export_hf")  # run afresh as `python -m scripts.export_hf` runs it
    runpy.run_module("scripts.export_hf", run_name="__main__")
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["vision_feature_select_strategy"] == "default" and config["vision_feature_layer"] == -2
    assert_llava_matches(ckpt, out, tiny_base["vision"])


def test_llava_export_of_siglip_keeps_every_patch(tiny_base_siglip, tmp_path):
    """SigLIP has no CLS: Llava's "default" would drop a real patch, so the export says "full"."""
    ckpt = perturbed_checkpoint(tiny_model_args(tiny_base_siglip, **LORA, lora_target="both"), str(tmp_path / "ckpt"))
    out = str(tmp_path / "hf")
    export_main(["--checkpoint", ckpt, "--out", out])
    assert LlavaForConditionalGeneration.from_pretrained(out).config.vision_feature_select_strategy == "full"
    assert_llava_matches(ckpt, out, tiny_base_siglip["vision"])


def test_llava_export_adds_the_image_token_when_the_tokenizer_lacks_it(tiny_base, tmp_path):
    """Real LLM tokenizers (Vicuna, Qwen2) have no "<image>" token: the export adds one and
    grows the embeddings, and the rest of the vocabulary keeps its ids and logits."""
    llm = str(tmp_path / "llm_without_image_token")
    shutil.copytree(tiny_base["llm"], llm)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        path = os.path.join(llm, name)
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(text.replace("<image>", "<unused_0>"))
    base = {"vision": tiny_base["vision"], "llm": llm}
    ckpt = perturbed_checkpoint(tiny_model_args(base, **LORA, lora_target="both"), str(tmp_path / "ckpt"))
    vocab = len(load_tokenizer_and_image_processor(tiny_model_args(base))[0])
    out = str(tmp_path / "hf")
    export_main(["--checkpoint", ckpt, "--out", out])
    processor = LlavaProcessor.from_pretrained(out)
    assert processor.tokenizer.encode("<image>", add_special_tokens=False) == [vocab]
    assert LlavaForConditionalGeneration.from_pretrained(out).config.text_config.vocab_size == vocab + 1
    assert_llava_matches(ckpt, out, tiny_base["vision"])


def test_resampler_export_opens_without_the_base(tiny_base, tmp_path, capsys):
    args = tiny_model_args(
        tiny_base, **LORA, lora_target="both", connector="resampler", resampler_num_queries=16, resampler_num_heads=4
    )
    ckpt = perturbed_checkpoint(args, str(tmp_path / "ckpt"))
    before, inputs, _ = load_checkpoint(ckpt)
    tokenizer, image_processor = inputs.tokenizer, inputs.image_processor
    ids = our_input_ids(before, tokenizer)
    pixel_values = image_processor(images=image(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = before(input_ids=ids, pixel_values=pixel_values).logits
    prompt = [([{"role": "user", "content": "<image>\n" + QUESTION}], [image()])]
    (expected_answer,) = generate_answers(before, inputs, prompt, max_new_tokens=5)

    out = str(tmp_path / "merged")
    export_main(["--checkpoint", ckpt, "--out", out])
    moved = str(tmp_path / "moved")
    shutil.move(out, moved)  # self-contained: the manifest names its towers relative to itself

    manifest = json.load(open(os.path.join(moved, MANIFEST)))
    assert (manifest["base"]["vision"], manifest["base"]["llm"]) == ("vision", "llm")
    assert manifest["adapters"] == [], "LoRA is merged into the exported towers"
    after, *_ = load_checkpoint(moved)
    with torch.no_grad():
        torch.testing.assert_close(after(input_ids=ids, pixel_values=pixel_values).logits, expected, atol=1e-4, rtol=0)
    # vision/ holds the whole tower, not our cut one, so it is a valid tower folder on its own.
    full = load_vision_encoder(os.path.join(moved, "vision"))
    assert len(full.encoder.layers) == full.config.num_hidden_layers == 3

    # And infer.py answers from the folder alone, as the model did before export.
    image_path = str(tmp_path / "shapes.png")
    image().save(image_path)
    capsys.readouterr()
    infer.main(["--checkpoint", moved, "--image", image_path, "--prompt", QUESTION, "--max_new_tokens", "5"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == expected_answer


def test_export_refuses_to_overwrite_its_checkpoint(tiny_base, tmp_path):
    ckpt = perturbed_checkpoint(tiny_model_args(tiny_base), str(tmp_path / "ckpt"))
    with pytest.raises(SystemExit, match="new folder"):
        export_main(["--checkpoint", ckpt, "--out", ckpt])


@pytest.mark.parametrize("family", FAMILIES)
def test_released_vlm_export_opens_in_transformers_and_answers_as_infer(family, tmp_path_factory, tmp_path):
    """A released VLM's checkpoint (LoRA + trained connector) exports as the model's own folder:
    transformers' Auto classes open it with its processor, and greedy generation gives the tokens
    our loaded checkpoint gives."""
    base = make_tiny_vlm(family, str(tmp_path_factory.getbasetemp() / "tiny_vlms" / family))
    args = ModelArguments(vlm_model=base, lora_enable=True, lora_r=4, lora_dropout=0.0)
    model = load_base(args)
    apply_freeze_policy(model, args)
    torch.manual_seed(0)
    with torch.no_grad():  # a trained delta and adapter, without training: every trained tensor moves
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    processor = load_released_processor(args)
    ckpt = str(tmp_path / "ckpt")
    save_checkpoint(model, ckpt, processor)
    export_main(["--checkpoint", ckpt, "--out", str(tmp_path / "hf")])

    exported, info = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    exported.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert write_hub_layout(str(tmp_path / "hf")) == {}, "the export is already in its hub layout"
    exported_processor = AutoProcessor.from_pretrained(str(tmp_path / "hf"))
    loaded, loaded_inputs, _ = load_checkpoint(ckpt)
    loaded_processor = loaded_inputs.processor
    image = Image.new("RGB", (48, 48), (200, 30, 30))
    prompt = [([{"role": "user", "content": "<image>\nWhat color is it?"}], [image])]
    ours = encode_batch(loaded_processor, prompt, add_generation_prompt=True)
    theirs = encode_batch(exported_processor, prompt, add_generation_prompt=True)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])  # the same processor and template
    generate = dict(max_new_tokens=6, do_sample=False, suppress_tokens=[exported_processor.tokenizer.eos_token_id])
    with torch.no_grad():
        expected = loaded.generate(**ours, **generate)
        got = exported.generate(**theirs, **generate)[:, theirs["input_ids"].shape[1]:]
    assert torch.equal(got, expected)
