"""Configuration of an imputation module."""

from __future__ import annotations

from dataclasses import dataclass

from mllm_missing.errors import ConfigError


@dataclass(frozen=True)
class ImputationConfig:
    """Which imputation fills absent embeddings.

    Args:
        method: a name registered in `IMPUTATIONS` (``zero``, ``mean``, ``learned_token``,
            ``translator``...).
        hidden_size: hidden width of learned imputers (translator).
        contrastive_weight: weight of the translator's InfoNCE term next to its regression loss.
        temperature: InfoNCE temperature.
        auxiliary_weight: weight of the imputation's own loss in the training objective.
        k: neighbours averaged by ``knn``.
    """

    method: str = "zero"
    hidden_size: int = 512
    contrastive_weight: float = 0.1
    temperature: float = 0.1
    auxiliary_weight: float = 1.0
    k: int = 5

    def __post_init__(self) -> None:
        from mllm_missing.strategies.imputation.module import IMPUTATIONS

        if self.method not in IMPUTATIONS:
            raise ConfigError(
                f"imputation.method must be one of {', '.join(IMPUTATIONS.names())}; "
                f"got {self.method!r}"
            )
        if self.hidden_size <= 0:
            raise ConfigError(f"imputation.hidden_size must be positive; got {self.hidden_size}")
        if self.temperature <= 0:
            raise ConfigError(f"imputation.temperature must be positive; got {self.temperature}")
        if self.k < 1:
            raise ConfigError(f"imputation.k must be >= 1; got {self.k}")
        for name in ("contrastive_weight", "auxiliary_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"imputation.{name} must be >= 0; got {getattr(self, name)}")
