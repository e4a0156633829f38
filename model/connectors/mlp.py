from torch import nn


class MLPProjector(nn.Module):
    """LLaVA-1.5's `mlp2x_gelu`: Linear -> GELU -> Linear, one output token per patch.

    Submodule names match transformers' `LlavaMultiModalProjector`, so export is a rename.
    """

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, llm_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, features):  # [N, P, C] -> [N, P, D]
        return self.linear_2(self.act(self.linear_1(features)))
