"""Configuration of correlated prompts (`correlated_prompts`)."""

from __future__ import annotations

from dataclasses import dataclass

from mllm_missing.errors import ConfigError
from mllm_missing.strategies.base import register_strategy
from mllm_missing.strategies.prompting import PromptConfig

__all__ = ["CorrelatedPromptsConfig"]


@register_strategy(
    "correlated_prompts",
    module="mllm_missing.strategies.correlated_prompts.module:CorrelatedPrompts",
)
@dataclass
class CorrelatedPromptsConfig(PromptConfig):
    """Correlated, presence-conditioned prompts with a modal-common part (after DCP).

    Args:
        rank: rank of the per-block map generating a block's prompts from the previous block's.
        common_dim: width of the modal-common prompts shared by every tower (0: none).
        (other fields: see `PromptConfig`)
    """

    rank: int = 32
    common_dim: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank < 1:
            raise ConfigError(f"strategy.rank must be >= 1; got {self.rank}")
        if self.common_dim < 0:
            raise ConfigError(f"strategy.common_dim must be >= 0; got {self.common_dim}")
