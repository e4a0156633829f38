import math

import torch
from torch import nn


def sincos_position_embedding(num_tokens: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine positions for a square patch grid (1-D when it is not square)."""

    def one_axis(positions, d):  # [n] -> [n, d]
        freqs = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float32) / (d // 2))
        angles = positions[:, None].float() * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    side = math.isqrt(num_tokens)
    if side * side != num_tokens or dim % 4:
        return one_axis(torch.arange(num_tokens), dim)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.cat([one_axis(rows.flatten(), dim // 2), one_axis(cols.flatten(), dim // 2)], dim=1)


class Resampler(nn.Module):
    """MiniCPM-V's perceiver resampler: `num_queries` learned queries cross-attend to the patch
    features, so every image costs the LLM a fixed number of tokens whatever its patch count."""

    help = "MiniCPM-V's perceiver resampler: resampler_num_queries tokens per image"
    exports_as_llava = False  # no transformers class holds it

    def __init__(self, vision_dim, llm_dim, num_vision_tokens, args):
        super().__init__()
        num_queries, num_heads = args.resampler_num_queries, args.resampler_num_heads
        self.num_vision_tokens = num_vision_tokens
        self.num_tokens = self.num_queries = num_queries
        self.query = nn.Parameter(torch.randn(num_queries, llm_dim) * 0.02)
        self.kv_proj = nn.Linear(vision_dim, llm_dim, bias=False)
        self.ln_q = nn.LayerNorm(llm_dim)
        self.ln_kv = nn.LayerNorm(llm_dim)
        self.attn = nn.MultiheadAttention(llm_dim, num_heads, batch_first=True)
        self.ln_post = nn.LayerNorm(llm_dim)
        self.proj = nn.Linear(llm_dim, llm_dim, bias=False)
        self.register_buffer(
            "pos_embed", sincos_position_embedding(num_vision_tokens, llm_dim), persistent=False
        )

    def forward(self, features):  # [N, P, C] -> [N, Q, D]
        kv = self.ln_kv(self.kv_proj(features))  # [N, P, D]
        queries = self.ln_q(self.query).unsqueeze(0).expand(kv.shape[0], -1, -1)  # [N, Q, D]
        out, _ = self.attn(queries, kv + self.pos_embed.to(kv.dtype), kv, need_weights=False)
        return self.proj(self.ln_post(out))

    def saved_bytes_per_image(self, trains: bool, act: int) -> float:
        """The kv path keeps per patch, the query path per query, attention its weights."""
        p, q, c, d = self.num_vision_tokens, self.num_queries, self.kv_proj.in_features, self.kv_proj.out_features
        return act * (p * (c + 5 * d) + q * (5 * d)) + 4 * (2 * p + q * self.attn.num_heads + 2 * q)
