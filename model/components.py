"""Which component a parameter belongs to: `vision`, `connector` or `llm`, for every model.

A composed base names its children so (`vision.encoder...`, `connector...`, `llm...`); a released
VLM names them its own way, and the same table maps both: `COMMON_MODULES`, the names most
families share, plus `FAMILY_MODULES[model_type]`, only what a family names otherwise. A
parameter's name is read from its deepest module name up, and the first name the table knows
decides: Qwen2.5-VL's connector `model.visual.merger` sits inside its vision module
`model.visual`, so `merger` wins there.

    model.vision_tower.encoder.layers.0.mlp.fc1.weight   -> vision     (llava, paligemma, gemma3, ...)
    model.visual.merger.mlp.0.weight                     -> connector  (qwen2_5_vl, qwen3_vl, glm4v)
    model.connector.modality_projection.proj.weight      -> connector  (smolvlm, idefics3)
    model.language_model.layers.0.self_attn.q_proj.weight -> llm
    lm_head.weight                                       -> llm        (the LM head belongs to the LLM)

Three rules decide what the names alone do not (each family's entry says which it follows):
(a) A bare parameter of the top model belongs to the connector: LLaVA-NeXT's and
    LLaVA-OneVision's `model.image_newline`, the learnt embedding written after each row of
    image features, exists only to join the tower's features to the LLM's sequence; LLaVA's own
    training scripts train and freeze it with the projector (`freeze_mm_mlp_adapter`).
(b) A part of the vision module that projects vision features into the LLM belongs to the
    connector, and trains with the merger: Qwen3-VL's `model.visual.deepstack_merger_list`
    (patch mergers of the merger's class whose outputs are added to the LLM's first hidden
    states) and GLM-4V's `model.visual.downsample` (the 2x2 convolution whose output, of the
    LLM's width `out_hidden_size`, is the merger's input). ms-swift's arch table puts the
    deepstack mergers in its aligner; LLaMA-Factory's per-family keys leave GLM-4V's downsample
    out of the frozen tower (only `patch_embed` and `blocks` freeze), so it trains with the
    merger there too. A part that runs between tower layers stays vision (MiniCPM-V's
    `vit_merger`: more tower layers follow it).
(c) A connector with a name of its own is named per family: Gemma 4's `model.embed_vision`
    (its multimodal embedder, as ms-swift's aligner for Gemma 3n). Its audio parts, unused by
    image-text data, ride with the tower (frozen unless the tower trains), as the peers' tables
    put `audio_tower` with the vision tower.

A family this table does not know is mapped from the config, without a code change:
`--vision_modules img_encoder --connector_modules mlp1` (see `ModelArguments`); the flags extend
a known family's table too.
"""

from __future__ import annotations

import re

COMPONENTS = ("vision", "connector", "llm")

# Module names that mark each component in most released VLMs (transformers 5.23) and in our composed one.
COMMON_MODULES = {
    "vision": ("vision", "vision_tower", "visual", "vision_model"),
    "connector": ("connector", "multi_modal_projector", "merger", "resampler", "mm_projector"),
    "llm": ("llm", "language_model", "text_model", "lm_head"),
}

# Every released family (its config's model_type) the repo knows, with what it names otherwise than
# COMMON_MODULES (rules a-c above). Children of `model.model` per family: docs/released_vlm_families.md.
# Each has a tiny fixture in fixtures/tiny_vlms.py (tests/test_families.py holds the two lists equal).
FAMILY_MODULES: dict[str, dict[str, tuple[str, ...]]] = {
    "llava": {},  # vision_tower, multi_modal_projector, language_model
    "llava_next": {"connector": ("image_newline",)},  # (a)
    "llava_onevision": {"connector": ("image_newline",)},  # (a)
    "qwen2_5_vl": {},  # visual (merger inside), language_model
    "qwen3_vl": {"connector": ("deepstack_merger_list",)},  # (b)
    "qwen3_5": {},  # visual (merger inside), language_model
    "glm4v": {"connector": ("downsample",)},  # (b)
    "smolvlm": {},  # vision_model, connector, text_model
    "idefics3": {},  # vision_model, connector, text_model
    "paligemma": {},  # vision_tower, multi_modal_projector, language_model
    "gemma3": {},  # vision_tower, multi_modal_projector, language_model
    "gemma4": {"connector": ("embed_vision",), "vision": ("audio_tower", "embed_audio")},  # (c)
    "internvl": {},  # vision_tower, multi_modal_projector, language_model
    "mistral3": {},  # vision_tower (Pixtral), multi_modal_projector (patch merger inside), language_model
    "lfm2_vl": {},  # vision_tower (SigLIP2), multi_modal_projector, language_model
    "minicpmv4_6": {},  # vision_tower (vit_merger inside: vision), merger, language_model
    "minicpmv4_7": {},  # as 4.6
}

# What else the code must know of a family, here beside the table above: families whose
# `token_type_ids` mark a bidirectional prefix (their processors' `suffix=`).
PREFIX_LM_TYPES = ("paligemma",)

# --packing true (model/packing.py): the families whose forward keeps the samples of a packed row
# apart when given positions that restart at each sample and no attention mask (transformers then
# builds the block-diagonal causal mask from the positions), by how their positions are made:
# "1d" (the restarted positions themselves) or "mrope" (each sample's 3-D positions from the
# model's own `get_rope_index`, under the restarted text positions the mask is built from).
PACKING_POSITIONS = {
    "llava": "1d", "llava_next": "1d", "llava_onevision": "1d", "mistral3": "1d", "internvl": "1d",
    "smolvlm": "1d", "idefics3": "1d",
    "qwen2_vl": "mrope", "qwen2_5_vl": "mrope", "qwen3_vl": "mrope", "glm4v": "mrope",
}
# Families that cannot be packed safely, and why (named in the refusal); any family in neither
# table is refused as not known to isolate.
NOT_PACKABLE = {
    "paligemma": "its prefix-LM mask (token_type_ids) is looked up by position, not by index, in transformers' "
                 "packed-sequence path, so a sample's prefix would attend to the wrong tokens",
    "gemma3": "its bidirectional image-token mask (token_type_ids) is looked up by position in transformers' "
              "packed-sequence path",
    "minicpmv4_6": "its LLM (Qwen3.5) has gated-delta-net layers (linear attention and a causal convolution) "
                   "that run across the whole row; only flash-attention's cu_seqlens would cut them",
    "minicpmv4_7": "its LLM (Qwen3.5) has gated-delta-net layers (linear attention and a causal convolution) "
                   "that run across the whole row (tests/test_packing.py saw its samples leak)",
    "lfm2_vl": "its LLM (LFM2) has short causal-convolution layers that run across the whole row",
    "gemma4": "packed under sdpa, its gradients differ from each sample run alone (embed_tokens by 4.3e-5, over "
              "tests/test_packing.py's 1e-5 bar), though its logits and its eager gradients match",
    "qwen3_5": "its gated-delta-net layers (linear attention and a causal convolution) run across the whole row; "
               "only flash-attention's cu_seqlens would cut them",
}

def _pooled_to(tokens: int, vision_config) -> int:
    """Gemma 3: a fixed number of tokens per image, average-pooled from the tower's patches."""
    side = vision_config.image_size // vision_config.patch_size
    return side * side // tokens


# How many of the tower's patches become one image token in the LLM's sequence, by the config
# field a family states it in (the memory plan reads it; the processor expands images by it).
# Each takes the field's value and the vision config.
PATCHES_PER_TOKEN_FIELDS = {
    "spatial_merge_size": lambda v, _: v * v,  # Qwen2-VL family, GLM-4V (vision_config), Mistral 3: 2x2
    "scale_factor": lambda v, _: v * v,  # Idefics3 / SmolVLM's pixel shuffle
    "downsample_mode": lambda v, _: int(str(v).rstrip("x")),  # MiniCPM-V 4.6 / 4.7: "16x"
    "downsample_ratio": lambda v, _: round(1 / v) ** 2,  # InternVL's pixel shuffle: 0.5
    "downsample_factor": lambda v, _: v * v,  # LFM2-VL's pixel unshuffle: 2
    "pooling_kernel_size": lambda v, _: v * v,  # Gemma 4 (vision_config): 3x3
    "mm_tokens_per_image": _pooled_to,  # Gemma 3: 256 per image
}


def patches_per_image_token(config) -> int:
    """1 (one token per patch: llava, PaliGemma), or the merge a family's config states."""
    vision_config = getattr(config, "vision_config", None)
    for holder in (config, vision_config):
        for field, merge in PATCHES_PER_TOKEN_FIELDS.items():
            if getattr(holder, field, None) is not None:
                return merge(getattr(holder, field), vision_config)
    return 1


def module_table(model_type: str | None = None, extra: dict[str, list[str] | None] | None = None) -> dict[str, str]:
    """{module name: component}: the common names, the family's own (`FAMILY_MODULES[model_type]`;
    None: a composed base or an unknown family) and a config's (`--vision_modules` ...)."""
    table = {name: component for component, names in COMMON_MODULES.items() for name in names}
    for names_by_component in (FAMILY_MODULES.get(model_type or "", {}), extra or {}):
        for component, names in names_by_component.items():
            table.update({name: component for name in names or []})
    return table


def component_of(name: str, table: dict[str, str]) -> str | None:
    """The component of a parameter (or module) name: its deepest module name in `table`, or
    None when no part of the name is known."""
    for part in reversed(name.split(".")):
        if part in table:
            return table[part]
    return None


def top_module(name: str) -> str:
    """The top-level module a parameter sits in, as a user maps it: `model.vision_tower` in a
    released VLM (whose children sit under `model.`), without the wrappers around the model."""
    parts = name.removeprefix("vlm.").removeprefix("base_model.model.").split(".")
    return ".".join(parts[:2] if parts[0] == "model" and len(parts) > 2 else parts[:1])


def is_under(name: str, modules: list[str]) -> bool:
    """Whether `name` is one of `modules` or inside one (wrappers' prefixes around it allowed)."""
    return any(f".{name}.".find(f".{module}.") >= 0 for module in modules)


# A numbered block of a stack: `layers.3` (decoders, CLIP/SigLIP towers), `blocks.3` (Qwen2-VL's tower).
_LAYER = re.compile(r"(?:^|\.)(?:layers|blocks)\.(\d+)(?=\.|$)")


def layer_index(name: str) -> int | None:
    """The index of the numbered block a parameter or module name sits in, the innermost one
    (`model.language_model.layers.3.mlp.up_proj.weight` -> 3, `visual.blocks.0` -> 0), or None
    outside every block (embeddings, final norms, heads, connectors)."""
    found = _LAYER.findall(name)
    return int(found[-1]) if found else None


# An export's weights under the names the family's released checkpoints use on the hub (what
# serving engines such as vLLM read; model/hub_layout.py writes them).
# model_type -> (pattern on a key as transformers 5.x saves it, its replacement in the hub layout).
# The look-ahead keeps a key already in the hub's layout as it is, so writing twice changes nothing.
_TOWER_UNDER_VISION_MODEL = (r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model.")
HUB_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "llava": (_TOWER_UNDER_VISION_MODEL,),  # CLIP (llava-1.5-hf) or SigLIP tower
    "llava_next": (_TOWER_UNDER_VISION_MODEL,),  # CLIP (llava-v1.6-*-hf)
    "llava_onevision": (_TOWER_UNDER_VISION_MODEL,),  # SigLIP (llava-onevision-qwen2-*-hf)
    "paligemma": (_TOWER_UNDER_VISION_MODEL,),  # SigLIP tower
}
