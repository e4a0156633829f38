"""Plain helpers the test files import (`from helpers import tiny_model_args`)."""

from __future__ import annotations

from config import ModelArguments


def tiny_model_args(tiny_base: dict, **overrides) -> ModelArguments:
    """ModelArguments for the tiny base fixture; `overrides` are any ModelArguments fields.
    The defaults (frozen tower and LLM, trainable connector) pass the conflict checks."""
    return ModelArguments(vision_model=tiny_base["vision"], llm_model=tiny_base["llm"], **overrides)
