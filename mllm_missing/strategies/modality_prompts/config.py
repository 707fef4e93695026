"""Configuration of modality-specific prompts (`modality_prompts`)."""

from __future__ import annotations

from dataclasses import dataclass

from mllm_missing.strategies.base import register_strategy
from mllm_missing.strategies.prompting import PromptConfig

__all__ = ["ModalityPromptsConfig"]


@register_strategy(
    "modality_prompts", module="mllm_missing.strategies.modality_prompts.module:ModalityPrompts"
)
@dataclass
class ModalityPromptsConfig(PromptConfig):
    """Modality-specific prompts: one prompt set per dataset modality; a sample's prompts are
    the sets of the modalities it has, side by side (``prompt_length`` positions each).

    The fields are those of `PromptConfig`.
    """
