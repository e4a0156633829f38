"""Seeded, randomly initialised tiny versions of released VLM families, built offline.

`make_tiny_vlm(family, out_dir, seed)` builds the transformers model of that `model_type` at toy
size (towers of 1-2 layers, hidden 32-64, a byte-level BPE tokenizer of a few hundred tokens with
the family's special tokens and chat template, image/video processors sized so a 48x48 image
becomes a handful of image tokens) and saves model and processor with `save_pretrained`, so that
`AutoModelForImageTextToText.from_pretrained(out_dir)` / `AutoProcessor.from_pretrained(out_dir)`
load it as they would a hub id. Nothing is downloaded. Facts measured on these models:
docs/released_vlm_families.md.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

FAMILIES = ("llava", "qwen2_5_vl", "smolvlm", "paligemma", "minicpmv4_6")
MARKER = "tiny_vlm.json"  # written last: its presence (same family and seed) means the save is complete

# ---------------------------------------------------------------------------------------------
# Chat templates. Each accepts a turn's content as a string or as a list of typed parts
# ({"type": "image"} / {"type": "text", "text": ...}), renders the family's image placeholder
# for each image part, and renders prefix-stably (first k turns = prefix of all turns).

# A turn's content: a string as is; a list of parts in order, `image` (and `video`) for those parts,
# the text for text parts.
def _parts(image: str, video: str | None = None) -> str:
    video_branch = f"{{% elif part['type'] == 'video' %}}{{{{ '{video}' }}}}" if video else ""
    return (
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        f"{{% if part['type'] == 'image' %}}{{{{ '{image}' }}}}{video_branch}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
    )


# llava-1.5-hf's shape ("USER: <image>\nq ASSISTANT: a"): image parts first, each as "<image>\n",
# then the text parts. Upstream ends an assistant turn with a space; this one ends it with </s>,
# as LLaVA's own training format (vicuna_v1) does, so a fine-tune learns to stop.
LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '</s>' }}{% else %}{{ ' ' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Qwen2.5-VL's ChatML, default system turn included, without the `add_vision_id` option.
QWEN2_5_VL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    + _parts("<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>")
    + "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# SmolVLM-Instruct's ("<|im_start|>User:<image>q<end_of_utterance>\nAssistant: a<end_of_utterance>\n"),
# plus string content.
SMOLVLM_TEMPLATE = (
    "{{ '<|im_start|>' }}"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}"
    "{% if message['content'] is not string and message['content'][0]['type'] == 'image' %}{{ ':' }}"
    "{% else %}{{ ': ' }}{% endif %}"
    + _parts("<image>", "<video>")
    + "{{ '<end_of_utterance>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# PaliGemma ships no chat template; its format is "<image>*N<bos>prefix\n" + "suffix<eos>", where the
# processor itself inserts <bos> after the last "<image>" and appends "\n" to the whole text. So
# a user turn renders its parts (images first by convention), an assistant turn "\n" + text +
# "<eos>", and the generation prompt adds nothing: the processor's trailing "\n" is the separator.
PALIGEMMA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '\n' }}{% endif %}"
    + _parts("<image>")
    + "{% if message['role'] == 'assistant' %}{{ '<eos>' }}{% endif %}"
    "{% endfor %}"
)

# MiniCPM-V 4.6 (Qwen3.5 LLM): ChatML; one <|image_pad|> per image, which the processor expands to
# "<image_id>k</image_id><image>" + <|image_pad|>*n + "</image>" (+ slices).
MINICPMV4_6_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    + _parts("<|image_pad|>", "<|video_pad|>")
    + "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# ---------------------------------------------------------------------------------------------
# Tokenizers: byte-level BPE (any text encodes) trained on the demo vocabulary plus the family's
# role words, with the family's special tokens as single tokens.

_EXTRA_TEXT = [
    "USER: ASSISTANT: User: Assistant: system user assistant",
    "You are a helpful assistant.",
    "Picture Video 0 1 2 3 4 5 6 7 8 9",
]


def _corpus() -> list[str]:
    from tools.synthetic import vocabulary

    return vocabulary() + _EXTRA_TEXT


def _tokenizer(specials: list[str], chat_template: str, vocab_size: int = 384, bos_template: str | None = None,
               **named):
    """`specials` become single special tokens (ids 0..n-1, in order); `named` are the tokenizer's
    named tokens (eos_token=..., pad_token=...) and model-specific ones (image_token=...), the
    latter saved in tokenizer_config.json's extra_special_tokens and readable as attributes."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from tools.tiny_base import train_bpe

    bpe = train_bpe(_corpus(), specials, vocab_size)
    if bos_template is not None:  # Llama-style: the tokenizer, not the template, prepends <s>
        bos_id = bpe.token_to_id(bos_template)
        bpe.post_processor = processors.TemplateProcessing(
            single=f"{bos_template} $A", pair=f"{bos_template} $A $B:1", special_tokens=[(bos_template, bos_id)]
        )
    standard = {"bos_token", "eos_token", "pad_token", "unk_token"}
    model_specific = {k: v for k, v in named.items() if k not in standard}
    kwargs = {k: v for k, v in named.items() if k in standard}
    if model_specific:
        kwargs["extra_special_tokens"] = model_specific
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **kwargs)
    tokenizer.chat_template = chat_template
    return tokenizer


def _ids(tokenizer, *tokens: str) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    for token, i in zip(tokens, ids, strict=True):
        if i is None or tokenizer.convert_ids_to_tokens(i) != token:
            raise ValueError(f"{token!r} is not a single token of the tiny tokenizer")
    return ids


def _generation_ids(model, tokenizer) -> None:
    gen = model.generation_config
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = tokenizer.bos_token_id


# Shared tiny sizes.
_LLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


# ---------------------------------------------------------------------------------------------
# Families. Each returns (model, processor); the caller seeds torch before and saves both.


def _llava():
    """llava-1.5 shape: CLIP tower (48 px, patch 12 -> 16 patches + CLS), 2-layer MLP projector,
    Llama LLM. vision_feature_layer=-2 and strategy "default" (drop CLS) as upstream."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = _tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], LLAVA_TEMPLATE, bos_template="<s>",
                           bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           image_token="<image>")
    (image_id,) = _ids(tokenizer, "<image>")
    size, patch = 48, 12
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_TEMPLATE, image_token="<image>")
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=size, patch_size=patch, projection_dim=32, **_VISION).to_dict(),
        text_config=LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                **_LLM).to_dict(),
        image_token_index=image_id, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    return LlavaForConditionalGeneration(config), processor


def _qwen2_5_vl():
    """Qwen2.5-VL: ViT (patch 8, temporal patch 2, window attention + full attention in the last
    block) whose `merger` (2x2 spatial merge + MLP) sits inside `model.visual`; Qwen2 LLM with
    3-axis M-RoPE. min/max_pixels 32x32..64x64: a 48x48 image is 6x6 patches -> 9 tokens."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tokenizer = _tokenizer(specials, QWEN2_5_VL_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    image_id, video_id, start_id, end_id = _ids(tokenizer, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                               "<|vision_end|>")
    patch, merge, temporal = 8, 2, 2
    pixels = dict(min_pixels=32 * 32, max_pixels=64 * 64, patch_size=patch, merge_size=merge,
                  temporal_patch_size=temporal)
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tokenizer,
                                    video_processor=Qwen2VLVideoProcessor(**pixels),
                                    chat_template=QWEN2_5_VL_TEMPLATE)
    head_dim = _LLM["hidden_size"] // _LLM["num_attention_heads"]  # 16 -> mrope over 8 frequencies
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=patch,
                           spatial_merge_size=merge, temporal_patch_size=temporal,
                           window_size=patch * merge * 2, fullatt_block_indexes=[1],
                           out_hidden_size=_LLM["hidden_size"]),
        text_config=dict(vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [2, 3, 3]}, **_LLM),
        image_token_id=image_id, video_token_id=video_id, vision_start_token_id=start_id,
        vision_end_token_id=end_id,
    )
    assert sum(config.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    return Qwen2_5_VLForConditionalGeneration(config), processor


def _smolvlm():
    """SmolVLM (Idefics3 layout): SigLIP-like tower (48 px, patch 8 -> 6x6 patches), connector =
    pixel shuffle (scale_factor 2) + linear, Llama LLM. Image splitting off: a 48x48 image is
    resized to 48x48 and becomes <fake_token_around_image><global-img> + 9 <image> + <fake...>."""
    from transformers import (
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>", "<fake_token_around_image>",
                "<global-img>", "<image>", "<video>"]
    tokenizer = _tokenizer(specials, SMOLVLM_TEMPLATE, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                           pad_token="<|im_end|>", unk_token="<|endoftext|>")
    (image_id,) = _ids(tokenizer, "<image>")
    size, patch, scale = 48, 8, 2
    image_seq_len = (size // patch) ** 2 // scale**2
    sizes = dict(size={"longest_edge": size}, max_image_size={"longest_edge": size})
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(do_image_splitting=False, **sizes),
        tokenizer=tokenizer,
        video_processor=SmolVLMVideoProcessor(**sizes),
        image_seq_len=image_seq_len,
        chat_template=SMOLVLM_TEMPLATE,
    )
    config = SmolVLMConfig(
        vision_config=dict(image_size=size, patch_size=patch, **_VISION),
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **_LLM),
        image_token_id=image_id, scale_factor=scale, pad_token_id=tokenizer.pad_token_id,
    )
    return SmolVLMForConditionalGeneration(config), processor


def _paligemma():
    """PaliGemma: SigLIP tower (48 px, patch 12 -> 16 tokens, no CLS), a single linear projector,
    Gemma LLM (tied head). The processor adds 1024 <locNNNN> + 128 <segNNN> tokens to the
    tokenizer when built, so the model's vocab is sized after building the processor."""
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
    )

    tokenizer = _tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<image>"], PALIGEMMA_TEMPLATE,
                           bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                           image_token="<image>")
    size, patch = 48, 12
    image_processor = SiglipImageProcessor(size={"height": size, "width": size})
    image_processor.image_seq_length = (size // patch) ** 2  # saved in preprocessor_config.json
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   chat_template=PALIGEMMA_TEMPLATE)
    (image_id,) = _ids(tokenizer, "<image>")
    hidden = _LLM["hidden_size"]
    config = PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", image_size=size, patch_size=patch,
                           vision_use_head=False, **_VISION),
        text_config=dict(model_type="gemma", vocab_size=len(tokenizer), head_dim=16,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **{**_LLM, "num_key_value_heads": 1}),
        image_token_index=image_id, vocab_size=len(tokenizer), projection_dim=hidden, hidden_size=hidden,
    )
    return PaliGemmaForConditionalGeneration(config), processor


def _minicpmv4_6():
    """MiniCPM-V 4.6: SigLIP-like NaViT tower (patch 4) with a window-attention `vit_merger` (2x2)
    inserted after layer `insert_layer_id`, then `model.merger` (another 2x2 + MLP) -> 16x fewer
    tokens; Qwen3.5 LLM (one gated-deltanet linear-attention layer + one full-attention layer).
    scale_resolution 48: a 48x48 image is 12x12 patches -> 9 tokens."""
    from transformers import (
        MiniCPMV4_6Config,
        MiniCPMV4_6ForConditionalGeneration,
        MiniCPMV4_6ImageProcessor,
        MiniCPMV4_6Processor,
        MiniCPMV4_6VideoProcessor,
    )

    named = dict(image_token="<|image_pad|>", video_token="<|video_pad|>", image_start_token="<image>",
                 image_end_token="</image>", slice_start_token="<slice>", slice_end_token="</slice>",
                 image_id_start_token="<image_id>", image_id_end_token="</image_id>")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *named.values(), "<think>", "</think>"]
    tokenizer = _tokenizer(specials, MINICPMV4_6_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                           **named)
    image_id, video_id = _ids(tokenizer, "<|image_pad|>", "<|video_pad|>")
    size, patch = 48, 4
    sizes = dict(scale_resolution=size, patch_size=patch, max_slice_nums=2, slice_mode=True)
    processor = MiniCPMV4_6Processor(image_processor=MiniCPMV4_6ImageProcessor(**sizes),
                                     video_processor=MiniCPMV4_6VideoProcessor(**sizes), tokenizer=tokenizer,
                                     chat_template=MINICPMV4_6_TEMPLATE)
    config = MiniCPMV4_6Config(
        vision_config=dict(image_size=size, patch_size=patch, **_VISION),
        # Qwen3.5 rotary: partial (a quarter of head_dim), interleaved 3-axis sections summing to
        # head_dim * 0.25 / 2 (upstream: head_dim 256, [11, 11, 10]).
        text_config=dict(model_type="qwen3_5_text", vocab_size=len(tokenizer), head_dim=32,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                                          "mrope_section": [2, 1, 1], "mrope_interleaved": True},
                         layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=4,
                         linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                         linear_num_value_heads=4, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **_LLM),
        # insert_layer_id must be < the tower's layers: otherwise the vit_merger never runs and the
        # merger silently reads only the first quarter of the packed patch sequence.
        image_token_id=image_id, video_token_id=video_id, image_size=size, insert_layer_id=0,
    )
    return MiniCPMV4_6ForConditionalGeneration(config), processor


_BUILDERS = {"llava": _llava, "qwen2_5_vl": _qwen2_5_vl, "smolvlm": _smolvlm, "paligemma": _paligemma,
             "minicpmv4_6": _minicpmv4_6}


def _complete(out_dir: str, family: str, seed: int) -> bool:
    try:
        with open(os.path.join(out_dir, MARKER)) as f:
            return json.load(f) == {"family": family, "seed": seed}
    except (OSError, ValueError):
        return False


def make_tiny_vlm(family: str, out_dir: str, seed: int = 0) -> str:
    """Builds (or finds already built) the tiny `family` VLM in `out_dir`; returns `out_dir`.

    Same seed, same weights (bit for bit); the tokenizer and processors do not depend on the seed.
    """
    if family not in _BUILDERS:
        raise ValueError(f"family {family!r}: choose one of {FAMILIES}")
    if _complete(out_dir, family, seed):
        return out_dir
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = _BUILDERS[family]()
    model = model.float().eval()
    _generation_ids(model, processor.tokenizer)

    # Build beside out_dir and move it in with one rename, so a half-written folder never looks complete.
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not os.path.exists(os.path.join(out_dir, MARKER)):
            raise FileExistsError(f"{out_dir} is not empty and holds no tiny VLM: not overwriting it")
        shutil.rmtree(out_dir)  # another family or seed built by this function: replace it whole
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tiny_vlm-", dir=parent)
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        with open(os.path.join(staging, MARKER), "w") as f:
            json.dump({"family": family, "seed": seed}, f)
        os.chmod(staging, 0o755)  # mkdtemp makes it 0o700
        try:
            os.replace(staging, out_dir)  # out_dir is absent or empty here
        except OSError:
            if not _complete(out_dir, family, seed):  # not a concurrent build of the same model
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
