"""Imputation modules: fill the embeddings of absent modalities before fusion.

Registered by name in `IMPUTATIONS`; build one with `build_imputation(ImputationConfig(...), dims)`.
"""

from mllm_missing.strategies.imputation.config import ImputationConfig
from mllm_missing.strategies.imputation.module import (
    IMPUTATIONS,
    Imputation,
    KnnImputation,
    LearnedTokenImputation,
    MeanImputation,
    TranslatorImputation,
    ZeroImputation,
    build_imputation,
)

__all__ = [
    "IMPUTATIONS",
    "Imputation",
    "ImputationConfig",
    "KnnImputation",
    "LearnedTokenImputation",
    "MeanImputation",
    "TranslatorImputation",
    "ZeroImputation",
    "build_imputation",
]
