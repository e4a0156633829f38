"""Which component a parameter belongs to: `vision`, `connector` or `llm`, for every model.

A composed base names its children so (`vision.encoder...`, `connector...`, `llm...`); a released
VLM names them its own way, and the same table maps both. A parameter's name is read from its
deepest module name up, and the first name the table knows decides: Qwen2.5-VL's connector
`model.visual.merger` sits inside its vision module `model.visual`, so `merger` wins there.

    model.vision_tower.encoder.layers.0.mlp.fc1.weight   -> vision     (llava, paligemma, minicpmv4_6)
    model.visual.merger.mlp.0.weight                     -> connector  (qwen2_5_vl)
    model.connector.modality_projection.proj.weight      -> connector  (smolvlm)
    model.language_model.layers.0.self_attn.q_proj.weight -> llm
    lm_head.weight                                       -> llm        (the LM head belongs to the LLM)

A family this table does not know is mapped from the config, without a code change:
`--vision_modules img_encoder --connector_modules mlp1` (see `ModelArguments`).
"""

from __future__ import annotations

import re

COMPONENTS = ("vision", "connector", "llm")

# Module names that mark each component, in transformers' released VLMs and in our composed one.
KNOWN_MODULES = {
    "vision": ("vision", "vision_tower", "visual", "vision_model"),
    "connector": ("connector", "multi_modal_projector", "merger", "resampler", "mm_projector"),
    "llm": ("llm", "language_model", "text_model", "lm_head"),
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
    "llava": "1d", "smolvlm": "1d", "idefics3": "1d",
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
    "qwen3_5": "its gated-delta-net layers (linear attention and a causal convolution) run across the whole row; "
               "only flash-attention's cu_seqlens would cut them",
}

# How many of the tower's patches become one image token in the LLM's sequence, by the config
# field a family states it in (the memory plan reads it; the processor expands images by it).
PATCHES_PER_TOKEN_FIELDS = {
    "spatial_merge_size": lambda v: v * v,  # Qwen2-VL family, in vision_config: a 2x2 merge
    "scale_factor": lambda v: v * v,  # Idefics3 / SmolVLM's pixel shuffle
    "downsample_mode": lambda v: int(str(v).rstrip("x")),  # MiniCPM-V 4.6: "16x"
}


def patches_per_image_token(config) -> int:
    """1 (one token per patch: llava, PaliGemma), or the merge a family's config states."""
    for holder in (config, getattr(config, "vision_config", None)):
        for field, merge in PATCHES_PER_TOKEN_FIELDS.items():
            if getattr(holder, field, None) is not None:
                return merge(getattr(holder, field))
    return 1


def module_table(extra: dict[str, list[str] | None] | None = None) -> dict[str, str]:
    """{module name: component}: the known names plus a config's own (`--vision_modules` ...)."""
    table = {name: component for component, names in KNOWN_MODULES.items() for name in names}
    for component, names in (extra or {}).items():
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
