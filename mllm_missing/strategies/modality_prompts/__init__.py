"""Modality-specific prompts (MSPs): one prompt set per modality, combined by what is present."""

from mllm_missing.strategies.modality_prompts.config import ModalityPromptsConfig
from mllm_missing.strategies.modality_prompts.module import ModalityPrompts

__all__ = ["ModalityPrompts", "ModalityPromptsConfig"]
