"""Packed rows on the model's side (`--packing true`): whether a model can keep the samples of a
row apart, and the positions that do it.

A packed row (data/packing.py) holds several whole samples, with `position_ids` [B, L] that
restart at 0 at each sample and no attention mask. transformers reads such positions as packed
sequences: its mask builder (`masking_utils.find_packed_sequence_indices`) makes the
block-diagonal causal mask for sdpa and eager, and its flash-attention path takes the sequence
boundaries from them (only for a single row: `_is_packed_sequence` needs batch size 1). So
isolation is transformers' own; this module checks that it applies, and for M-RoPE families
(Qwen2/2.5/3-VL, GLM-4V) builds each sample's 3-D positions with the model's own
`get_rope_index`: given [B, L] positions those families expand them to 3-D and build no packed
mask at all (every sample would see the ones before it).
"""

from __future__ import annotations

import torch

from errors import ConfigError
from model.components import NOT_PACKABLE, PACKING_POSITIONS
from patches import attention_implementation

# Kernels whose packed-sequence mask transformers builds from position ids (tests/test_packing.py).
MASKED_ATTENTION = ("sdpa", "eager")
# Kernels that read sequence boundaries from the position ids of one row (no mask at all).
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")
# Layer kinds of a text config that attend through the mask; anything else (linear attention,
# Mamba, convolutions) carries state along the whole row.
ATTENTION_LAYERS = ("full_attention", "sliding_attention", "chunked_attention")


def packing_family(model) -> str | None:
    """A released VLM's model_type; None for a composed base (its LLM is checked by its layers)."""
    return None if hasattr(model, "llm") else model.config.model_type


def text_config_of(model):
    """The config of the model's language model (a composed base's LLM, a released VLM's text part)."""
    return model.llm.config if hasattr(model, "llm") else model.config.get_text_config()


def check_packing(model, rows_per_device: int) -> None:
    """Refuse, before training, a model that `--packing true` cannot isolate samples in, naming
    the family, the layer kind or the attention kernel, and the way out."""
    family = packing_family(model)
    if family is not None and family not in PACKING_POSITIONS:
        why = NOT_PACKABLE.get(family, "it is not known to keep packed samples apart (model/components.py: "
                                        "PACKING_POSITIONS lists the families that do)")
        raise ConfigError(f"--packing true cannot train {family}: {why}. Train it with --packing false.")
    config = text_config_of(model)
    other_layers = sorted(set(getattr(config, "layer_types", None) or []) - set(ATTENTION_LAYERS))
    if other_layers:
        raise ConfigError(
            f"--packing true: the LLM ({config.model_type}) has {other_layers} layers, which carry state across "
            "every token of a row, so packed samples would see each other. Train it with --packing false."
        )
    kernel = attention_implementation(config) or "sdpa"
    if kernel in VARLEN_ATTENTION and rows_per_device != 1:
        raise ConfigError(
            f"--packing true with {kernel}: transformers cuts packed samples apart by their positions only in a "
            f"batch of one row, and --per_device_train_batch_size is {rows_per_device}. Set it to 1 and raise "
            "--packing_length instead (one long row holds as many samples)."
        )
    if kernel not in MASKED_ATTENTION + VARLEN_ATTENTION:
        raise ConfigError(
            f"--packing true: attention kernel {kernel} is not one whose packed mask is tested here "
            f"({', '.join(MASKED_ATTENTION + VARLEN_ATTENTION)}). Load the model with sdpa, or train with --packing false."
        )


def is_packed(inputs: dict) -> bool:
    """Positions without an attention mask: a packed batch's (data/packing.py)."""
    return inputs.get("position_ids") is not None and inputs.get("attention_mask") is None


def packed_position_ids(model_type: str, rope_model, inputs: dict) -> torch.Tensor:
    """The `position_ids` a family's forward takes for a packed batch: the restarted [B, L] ones
    as they are ("1d"), or for M-RoPE [4, B, L]: the restarted text positions (the mask is built
    from row 0) over each sample's [3, ...] positions from `rope_model.get_rope_index`."""
    position_ids = inputs["position_ids"]  # [B, L], 0 at each sample's first token
    if PACKING_POSITIONS.get(model_type) != "mrope":
        return position_ids
    return torch.cat([position_ids[None], sample_rope_positions(rope_model, inputs)])


def sample_spans(position_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of every sample of a packed batch, in token order."""
    spans = []
    for row, positions in enumerate(position_ids.tolist()):
        starts = [t for t, p in enumerate(positions) if p == 0] + [len(positions)]
        spans += [(row, a, b) for a, b in zip(starts[:-1], starts[1:], strict=True)]
    return spans


def sample_rope_positions(rope_model, inputs: dict) -> torch.Tensor:
    """[3, B, L]: every sample's M-RoPE positions as if it were alone. The samples are laid out
    as the rows of one padded batch [S, longest] and given to the model's own `get_rope_index` in
    one call: it reads the images' grids in order, row after row, which is their token order."""
    input_ids, types = inputs["input_ids"], inputs["mm_token_type_ids"]  # [B, L]
    spans = sample_spans(inputs["position_ids"])
    longest = max(end - start for _, start, end in spans)
    ids = input_ids.new_zeros(len(spans), longest)  # [S, longest]
    sample_types, mask = torch.zeros_like(ids, dtype=types.dtype), torch.zeros_like(ids)
    for k, (row, start, end) in enumerate(spans):
        ids[k, : end - start] = input_ids[row, start:end]
        sample_types[k, : end - start] = types[row, start:end]
        mask[k, : end - start] = 1
    grids = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in inputs}
    rope, _ = rope_model.get_rope_index(input_ids=ids, mm_token_type_ids=sample_types, attention_mask=mask, **grids)
    out = input_ids.new_zeros(3, *input_ids.shape)  # [3, B, L]
    for k, (row, start, end) in enumerate(spans):
        out[:, row, start:end] = rope[:, k, : end - start]
    return out
