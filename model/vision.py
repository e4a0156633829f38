"""The vision tower: any Hugging Face vision encoder, cut at the feature layer LLaVA reads."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_MAPPING


def load_vision_encoder(path: str, revision=None, weights: bool = True, **from_pretrained_kwargs) -> PreTrainedModel:
    """A vision encoder from a hub id or folder: a bare tower (CLIPVisionModel, SiglipVisionModel,
    ...) or the vision half of a dual encoder such as `openai/clip-vit-large-patch14-336`.
    `weights=False`: its shapes only, on the meta device, from the config alone."""
    config = AutoConfig.from_pretrained(path, revision=revision)
    vision_config = getattr(config, "vision_config", config)
    tower_class = MODEL_MAPPING[type(vision_config)]
    if not weights:
        with torch.device("meta"):
            # AutoModel.from_config builds the class MODEL_MAPPING names for this config.
            return AutoModel.from_config(vision_config, dtype=from_pretrained_kwargs["dtype"])
    return tower_class.from_pretrained(path, revision=revision, **from_pretrained_kwargs)


class VisionTower(nn.Module):
    """pixel_values [N, 3, H, W] -> patch features [N, P, C] of one hidden layer.

    Layers after the feature layer (and the pooling head) never reach the LLM, so they are cut
    off at build time: they would cost compute and, when the tower trains, sit in the optimizer
    without a gradient (which also breaks DDP without `find_unused_parameters`).
    """

    def __init__(self, encoder: PreTrainedModel, feature_layer: int = -2, select_strategy="default"):
        super().__init__()
        config = encoder.config
        num_layers = config.num_hidden_layers
        # hidden_states[0] is the embedding output, hidden_states[i] the output of layer i.
        self.layers_used = feature_layer % (num_layers + 1)
        inner = getattr(encoder, "vision_model", encoder)
        if hasattr(inner, "encoder") and hasattr(inner.encoder, "layers"):
            inner.encoder.layers = inner.encoder.layers[: self.layers_used]
            for head in ("post_layernorm", "head"):  # only feed the pooled output we never read
                if isinstance(getattr(inner, head, None), nn.Module):
                    setattr(inner, head, nn.Identity())
        self.encoder = encoder
        self.hidden_size = config.hidden_size
        self.image_size = config.image_size
        self.num_patches = (config.image_size // config.patch_size) ** 2
        self.has_cls = any(n.endswith("class_embedding") for n, _ in encoder.named_parameters())
        self.drop_cls = self.has_cls and select_strategy == "default"
        self.num_tokens = self.num_patches + (self.has_cls and not self.drop_cls)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(p.dtype for p in self.encoder.parameters() if p.dtype.is_floating_point)
        out = self.encoder(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
        features = out.hidden_states[self.layers_used]  # [N, P(+1), C]
        return features[:, 1:] if self.drop_cls else features  # [N, num_tokens, C]
