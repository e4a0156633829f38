"""Connectors map vision features [N, P, C_vision] to LLM input embeddings [N, T, D_llm].

Adding a connector is one new file here plus one line in `build_connector`.
"""

from torch import nn

from model.connectors.mlp import MLPProjector
from model.connectors.resampler import Resampler


def build_connector(name: str, vision_dim: int, llm_dim: int, num_vision_tokens: int, args) -> nn.Module:
    if name == "mlp2x_gelu":
        return MLPProjector(vision_dim, llm_dim)
    if name == "resampler":
        return Resampler(
            vision_dim, llm_dim, num_vision_tokens, args.resampler_num_queries, args.resampler_num_heads
        )
    raise ValueError(f"Unknown connector {name!r}: choose mlp2x_gelu or resampler.")


def num_output_tokens(connector: nn.Module, num_vision_tokens: int) -> int:
    """Image tokens the LLM sees per image."""
    return getattr(connector, "num_queries", num_vision_tokens)
