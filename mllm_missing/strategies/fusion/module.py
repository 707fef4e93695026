"""Fusion modules: concatenation of per-modality projections."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mllm_missing.registry import Registry
from mllm_missing.strategies.fusion.config import FusionConfig
from mllm_missing.types import Modality

FUSIONS: Registry[type[Fusion]] = Registry("fusion")


class Fusion(nn.Module):
    """Base class: maps modality -> (batch, dim) embeddings and the presence to (batch, out_dim).

    Args:
        dims: embedding size of each modality.
        config: the fusion configuration.
    """

    out_dim: int

    def __init__(self, dims: Mapping[Modality, int], config: FusionConfig) -> None:
        super().__init__()
        self.dims = {Modality.parse(k): int(v) for k, v in dims.items()}
        self.config = config

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters this module trains."""
        return [p for p in self.parameters() if p.requires_grad]


@FUSIONS.register("concat")
class ConcatFusion(Fusion):
    """Project each modality to `hidden_size` (linear + GELU) and concatenate, in `dims` order."""

    def __init__(self, dims: Mapping[Modality, int], config: FusionConfig) -> None:
        super().__init__(dims, config)
        self.projections = nn.ModuleDict(
            {
                m.value: nn.Sequential(nn.Linear(d, config.hidden_size), nn.GELU())
                for m, d in self.dims.items()
            }
        )
        self.dropout = nn.Dropout(config.dropout)
        self.out_dim = config.hidden_size * len(self.dims)

    def forward(
        self, embeddings: Mapping[Modality, torch.Tensor], presence: torch.Tensor
    ) -> torch.Tensor:
        """Fused (batch, out_dim) representation; `presence` is unused (inputs are imputed)."""
        del presence
        parts = [self.projections[m.value](embeddings[m]) for m in self.dims]
        return self.dropout(torch.cat(parts, dim=-1))


def build_fusion(config: FusionConfig, dims: Mapping[Modality, int]) -> Fusion:
    """Build the fusion module named by `config` for embeddings of sizes `dims`."""
    return FUSIONS.get(config.method)(dims, config)
