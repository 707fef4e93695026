"""Missing-aware prompts (MAP, Lee et al. CVPR 2023): one prompt set per missing case."""

from mllm_missing.strategies.map_prompts.config import MapPromptsConfig
from mllm_missing.strategies.map_prompts.module import MapPrompts

__all__ = ["MapPrompts", "MapPromptsConfig"]
