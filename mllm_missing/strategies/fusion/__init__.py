"""Fusion modules: combine the (imputed) per-modality embeddings into one representation.

Registered by name in `FUSIONS`; build one with `build_fusion(FusionConfig(...), dims)`.
"""

from mllm_missing.strategies.fusion.config import FusionConfig
from mllm_missing.strategies.fusion.module import FUSIONS, ConcatFusion, Fusion, build_fusion

__all__ = ["FUSIONS", "ConcatFusion", "Fusion", "FusionConfig", "build_fusion"]
