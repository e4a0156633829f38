"""run/trainer.py: training forwards build no KV cache."""

from __future__ import annotations

import torch

from config import ModelArguments, TrainArguments
from run.checkpoint import load_base
from run.trainer import VLMTrainer


def test_a_released_vlm_trains_without_a_kv_cache(released_vlm, tmp_path):
    """Qwen2.5-VL's LLM reads `use_cache` from its text config, which transformers' Trainer leaves
    True (it sets the top config's, and ours is one level further down): every training forward
    copied every layer's keys and values into a DynamicCache."""
    model = load_base(ModelArguments(vlm_model=released_vlm("qwen2_5_vl")))
    language_model = model.base.model.language_model
    embeds = torch.randn(1, 4, language_model.config.hidden_size)
    model.train()
    assert language_model(inputs_embeds=embeds).past_key_values is not None  # what the Trainer left
    VLMTrainer(model=model, args=TrainArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True))
    assert language_model(inputs_embeds=embeds).past_key_values is None
    assert all(not getattr(getattr(m, "config", None), "use_cache", False) for m in model.modules())
