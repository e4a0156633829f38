"""Connectors map vision features [N, P, C_vision] to LLM input embeddings [N, T, D_llm].

`CONNECTORS` is the one table of them: `--connector NAME` picks one, and the config's choices,
the memory plan and the export read it. Adding a connector is one file here and one line below.
Each class is built as `cls(vision_dim, llm_dim, num_vision_tokens, args)`, says how many tokens
it emits per image (`num_tokens`), and what its training keeps per image for the memory plan
(`saved_bytes_per_image`).
"""

from model.connectors.mlp import MLPProjector
from model.connectors.resampler import Resampler

CONNECTORS = {
    "mlp2x_gelu": MLPProjector,
    "resampler": Resampler,
}
