"""Configuration of an imputation module."""

from __future__ import annotations

from dataclasses import dataclass

from mllm_missing.errors import ConfigError


@dataclass(frozen=True)
class ImputationConfig:
    """Which imputation fills absent embeddings.

    Args:
        method: a name registered in `IMPUTATIONS` (``zero``, ``learned_token``...).
    """

    method: str = "zero"

    def __post_init__(self) -> None:
        from mllm_missing.strategies.imputation.module import IMPUTATIONS

        if self.method not in IMPUTATIONS:
            raise ConfigError(
                f"imputation.method must be one of {', '.join(IMPUTATIONS.names())}; "
                f"got {self.method!r}"
            )
