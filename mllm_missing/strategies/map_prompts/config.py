"""Configuration of missing-aware prompts (`map_prompts`)."""

from __future__ import annotations

from dataclasses import dataclass

from mllm_missing.strategies.base import register_strategy
from mllm_missing.strategies.prompting import PromptConfig

__all__ = ["MapPromptsConfig"]


@register_strategy("map_prompts", module="mllm_missing.strategies.map_prompts.module:MapPrompts")
@dataclass
class MapPromptsConfig(PromptConfig):
    """Missing-aware prompts: one learnable prompt set per missing case, chosen per sample.

    The fields are those of `PromptConfig` (``prompt_type``, ``prompt_length``,
    ``prompt_layers``, ``init``, ``init_std``, ``modalities``).
    """
