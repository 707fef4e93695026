"""Correlated prompts (the DCP idea): later-block prompts generated from earlier ones."""

from mllm_missing.strategies.correlated_prompts.config import CorrelatedPromptsConfig
from mllm_missing.strategies.correlated_prompts.module import CorrelatedPrompts

__all__ = ["CorrelatedPrompts", "CorrelatedPromptsConfig"]
