"""Configuration of a fusion module."""

from __future__ import annotations

from dataclasses import dataclass

from mllm_missing.errors import ConfigError


@dataclass(frozen=True)
class FusionConfig:
    """How per-modality embeddings are combined.

    Args:
        method: a name registered in `FUSIONS` (``concat``...).
        hidden_size: width each modality is projected to before fusion.
        dropout: dropout on the fused representation.
        num_heads: attention heads of ``masked_attention`` (must divide hidden_size).
    """

    method: str = "concat"
    hidden_size: int = 256
    dropout: float = 0.1
    num_heads: int = 4

    def __post_init__(self) -> None:
        from mllm_missing.strategies.fusion.module import FUSIONS

        if self.method not in FUSIONS:
            raise ConfigError(
                f"fusion.method must be one of {', '.join(FUSIONS.names())}; got {self.method!r}"
            )
        if self.hidden_size <= 0:
            raise ConfigError(f"fusion.hidden_size must be positive; got {self.hidden_size}")
        if self.num_heads <= 0 or self.hidden_size % self.num_heads:
            raise ConfigError(
                f"fusion.num_heads must be positive and divide hidden_size "
                f"({self.hidden_size}); got {self.num_heads}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"fusion.dropout must be in [0, 1); got {self.dropout}")
