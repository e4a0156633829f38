from torch import nn


class MLPProjector(nn.Module):
    """LLaVA-1.5's `mlp2x_gelu`: Linear -> GELU -> Linear, one output token per patch.

    Submodule names match transformers' `LlavaMultiModalProjector`, so export is a rename.
    """

    help = "LLaVA-1.5's two-layer GELU MLP: one image token per patch"
    exports_as_llava = True  # scripts/export_hf.py: a Llava projector, weight for weight

    def __init__(self, vision_dim: int, llm_dim: int, num_vision_tokens: int, args=None):
        super().__init__()
        self.num_tokens = num_vision_tokens
        self.linear_1 = nn.Linear(vision_dim, llm_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, features):  # [N, P, C] -> [N, P, D]
        return self.linear_2(self.act(self.linear_1(features)))

    def saved_bytes_per_image(self, trains: bool, act: int) -> float:
        """A trained projector keeps its input and GELU's; a frozen one only what the LLM's
        gradient passes back through (its hidden)."""
        c, d = self.linear_1.in_features, self.linear_1.out_features
        return act * self.num_tokens * ((c + 2 * d) if trains else d)
