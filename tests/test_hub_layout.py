"""model/hub_layout.py: an export's weights under the names its family's released checkpoints have
on the hub (what vLLM and transformers 4.x read), and transformers 5.x still opens them exactly."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText

from model.hub_layout import HUB_RENAMES, write_hub_layout


def saved_keys(folder: str) -> list[str]:
    with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:
        return sorted(f.keys())


def resaved(released_vlm, family: str, folder: str):
    """The tiny `family` model as transformers 5.x saves it: (model, folder)."""
    model = AutoModelForImageTextToText.from_pretrained(released_vlm(family)).eval()
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("family", sorted(HUB_RENAMES))
def test_tower_is_written_under_vision_model_and_transformers_opens_it_exactly(family, released_vlm, tmp_path):
    model, folder = resaved(released_vlm, family, str(tmp_path / family))
    before = saved_keys(folder)
    assert any(k.startswith("vision_tower.embeddings.") for k in before), "transformers' own layout changed"

    renamed = write_hub_layout(folder)
    after = saved_keys(folder)
    tower = [k for k in after if k.startswith("vision_tower.")]
    assert tower and all(k.startswith("vision_tower.vision_model.") for k in tower)
    assert sorted(renamed.values()) == tower and len(after) == len(before)  # the tower's keys, no other
    assert write_hub_layout(folder) == {}, "a folder already in the hub's layout is left as it is"

    reopened, info = AutoModelForImageTextToText.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    expected = model.state_dict()
    for name, tensor in reopened.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_other_families_keep_the_layout_transformers_writes(released_vlm, tmp_path):
    """Qwen2.5-VL's saved keys are already its hub checkpoints' (`visual.*`, `model.layers.*`)."""
    assert "qwen2_5_vl" not in HUB_RENAMES
    _, folder = resaved(released_vlm, "qwen2_5_vl", str(tmp_path / "qwen"))
    before = saved_keys(folder)
    assert write_hub_layout(folder) == {} and saved_keys(folder) == before


def test_a_sharded_folder_has_its_index_renamed_too(released_vlm, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(released_vlm("llava"))
    folder = str(tmp_path / "sharded")
    model.save_pretrained(folder, max_shard_size="100KB")
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        assert len(set(json.load(f)["weight_map"].values())) > 1
    write_hub_layout(folder)
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    assert not [k for k in weight_map if k.startswith("vision_tower.") and ".vision_model." not in k]
    _, info = AutoModelForImageTextToText.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
