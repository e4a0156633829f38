"""Connectors are one table (model/connectors/__init__.py: name -> class): a new one is one file
and one line, and the config, the model, the memory plan and a checkpoint take it from there."""

from __future__ import annotations

import textwrap

import pytest
import torch
from helpers import tiny_model_args
from test_checkpoint import tiny_batch, train_steps

from cli import format_help
from config import ALL_ARGUMENTS, ConfigError
from model.connectors import CONNECTORS
from model.freeze import apply_freeze_policy
from model.memory_plan import plan_memory
from run.checkpoint import load_base, load_checkpoint, save_checkpoint

TOY = '''
from torch import nn


class ToyConnector(nn.Module):
    """One linear layer, one token per patch."""

    help = "one linear layer"
    exports_as_llava = False

    def __init__(self, vision_dim, llm_dim, num_vision_tokens, args):
        super().__init__()
        self.num_tokens = num_vision_tokens
        self.proj = nn.Linear(vision_dim, llm_dim)

    def forward(self, features):
        return self.proj(features)

    def saved_bytes_per_image(self, trains, act):
        return act * self.num_tokens * self.proj.in_features
'''


def test_a_new_connector_is_one_file_and_one_line(tiny_base, tmp_path, monkeypatch):
    (tmp_path / "toy_connector.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path))
    import toy_connector  # local: the module is the file written just above, importable only now

    with pytest.raises(ConfigError, match="mlp2x_gelu, resampler"):
        tiny_model_args(tiny_base, connector="toy")
    monkeypatch.setitem(CONNECTORS, "toy", toy_connector.ToyConnector)  # the one line

    args = tiny_model_args(tiny_base, connector="toy")
    model = load_base(args)
    rows = {row.component: row for row in apply_freeze_policy(model, args)}
    assert isinstance(model.connector, toy_connector.ToyConnector) and rows["connector"].mode == "full"
    assert model.num_image_tokens == model.vision.num_tokens  # what the connector says it emits
    before = model.connector.proj.weight.detach().clone()
    batch = tiny_batch(model)
    train_steps(model, batch)
    assert not torch.equal(model.connector.proj.weight, before)  # it trained
    plan = plan_memory(model, batch_size=2, seq_len=batch["input_ids"].shape[1], gradient_checkpointing=False)
    assert plan.activations_no_ckpt > 0

    save_checkpoint(model, str(tmp_path / "ckpt"))
    loaded, *_ = load_checkpoint(str(tmp_path / "ckpt"))
    assert torch.equal(loaded.connector.proj.weight, model.connector.proj.weight)


@pytest.mark.parametrize("name", sorted(CONNECTORS))
def test_every_connector_says_its_tokens_and_help(name, tiny_base):
    model = load_base(tiny_model_args(tiny_base, connector=name, resampler_num_queries=16, resampler_num_heads=4))
    features = torch.randn(2, model.vision.num_tokens, model.vision.hidden_size)
    assert model.connector(features).shape[1] == model.connector.num_tokens == model.num_image_tokens
    # `train.py --help` describes it on the --connector line, in the connector's own words.
    connector_line = next(line for line in format_help(ALL_ARGUMENTS).splitlines() if line.lstrip().startswith("--connector "))
    assert CONNECTORS[name].help.strip() and f"{name}: {CONNECTORS[name].help}" in connector_line
