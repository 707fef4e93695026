"""Fusion modules: combine the (imputed) per-modality embeddings into one representation.

Registered by name in `FUSIONS`; build one with `build_fusion(FusionConfig(...), dims)`.
"""

from mllm_missing.strategies.fusion.config import FusionConfig
from mllm_missing.strategies.fusion.module import (
    FUSIONS,
    ConcatFusion,
    Fusion,
    GatedFusion,
    LateFusion,
    MaskedAttentionFusion,
    build_fusion,
)

__all__ = [
    "FUSIONS",
    "ConcatFusion",
    "Fusion",
    "FusionConfig",
    "GatedFusion",
    "LateFusion",
    "MaskedAttentionFusion",
    "build_fusion",
]
