"""Fusion modules: combine per-modality embeddings into one representation.

- ``concat``: project each modality and concatenate (absent ones enter as imputed).
- ``masked_attention``: one token per modality plus a summary token through a transformer layer
  whose attention masks absent modalities out (their imputed values are never read).
- ``late``: encode each modality on its own and average over the present ones only.
- ``gated``: concatenation with a learned gate per modality conditioned on the presence mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from mllm_missing.registry import Registry
from mllm_missing.strategies.fusion.config import FusionConfig
from mllm_missing.types import MODALITY_ORDER, Modality

FUSIONS: Registry[type[Fusion]] = Registry("fusion")


class Fusion(nn.Module):
    """Base class: maps modality -> (batch, dim) embeddings and the presence to (batch, out_dim).

    Args:
        dims: embedding size of each modality.
        config: the fusion configuration.
    """

    #: One line saying what the module does (the scheduler shows it to its LLM).
    description: ClassVar[str] = ""

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

    description = "projects each modality and concatenates them, imputed ones included"

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


def _presence_columns(dims: Mapping[Modality, int], presence: torch.Tensor) -> torch.Tensor:
    """Bool (batch, len(dims)): presence of the fusion's modalities, in `dims` order."""
    return torch.stack([presence[:, MODALITY_ORDER.index(m)] for m in dims], dim=1)


def _projections(dims: Mapping[Modality, int], hidden: int) -> nn.ModuleDict:
    return nn.ModuleDict(
        {m.value: nn.Sequential(nn.Linear(d, hidden), nn.GELU()) for m, d in dims.items()}
    )


@FUSIONS.register("masked_attention")
class MaskedAttentionFusion(Fusion):
    """Modality tokens + a summary token through one transformer encoder layer; absent
    modalities are masked out of attention, so what imputation put there is ignored."""

    description = "attends over modality tokens with absent modalities masked out"

    def __init__(self, dims: Mapping[Modality, int], config: FusionConfig) -> None:
        super().__init__(dims, config)
        hidden = config.hidden_size
        self.projections = nn.ModuleDict(
            {m.value: nn.Linear(d, hidden) for m, d in self.dims.items()}
        )
        self.modality_embedding = nn.Parameter(torch.zeros(len(self.dims), hidden))
        self.summary = nn.Parameter(torch.zeros(1, 1, hidden))
        nn.init.normal_(self.summary, std=0.02)
        nn.init.normal_(self.modality_embedding, std=0.02)
        self.layer = nn.TransformerEncoderLayer(
            hidden,
            nhead=config.num_heads,
            dim_feedforward=2 * hidden,
            dropout=config.dropout,
            batch_first=True,
            norm_first=True,
        )
        self.norm = nn.LayerNorm(hidden)
        self.out_dim = hidden

    def forward(
        self, embeddings: Mapping[Modality, torch.Tensor], presence: torch.Tensor
    ) -> torch.Tensor:
        """Summary-token output (batch, hidden_size)."""
        tokens = torch.stack([self.projections[m.value](embeddings[m]) for m in self.dims], dim=1)
        tokens = tokens + self.modality_embedding
        batch = tokens.shape[0]
        sequence = torch.cat([self.summary.expand(batch, -1, -1), tokens], dim=1)
        present = _presence_columns(self.dims, presence)
        padding = torch.cat([present.new_zeros(batch, 1), ~present], dim=1)
        return self.norm(self.layer(sequence, src_key_padding_mask=padding)[:, 0])


@FUSIONS.register("late")
class LateFusion(Fusion):
    """Encode each modality separately and average the encodings over present modalities."""

    description = "encodes each modality on its own and averages over the present ones"

    def __init__(self, dims: Mapping[Modality, int], config: FusionConfig) -> None:
        super().__init__(dims, config)
        self.projections = _projections(self.dims, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.out_dim = config.hidden_size

    def forward(
        self, embeddings: Mapping[Modality, torch.Tensor], presence: torch.Tensor
    ) -> torch.Tensor:
        """Mean over present modalities of the per-modality encodings (batch, hidden_size)."""
        encoded = torch.stack([self.projections[m.value](embeddings[m]) for m in self.dims], dim=1)
        weights = _presence_columns(self.dims, presence).to(encoded.dtype).unsqueeze(-1)
        fused = (encoded * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.dropout(fused)


@FUSIONS.register("gated")
class GatedFusion(Fusion):
    """Concatenate per-modality projections, each scaled by a learned gate in (0, 1) computed
    from that projection and the presence mask (so the model can turn an imputed modality down)."""

    description = "concatenates projections scaled by learned gates conditioned on the presence"

    def __init__(self, dims: Mapping[Modality, int], config: FusionConfig) -> None:
        super().__init__(dims, config)
        hidden = config.hidden_size
        self.projections = _projections(self.dims, hidden)
        self.gates = nn.ModuleDict(
            {m.value: nn.Linear(hidden + len(self.dims), 1) for m in self.dims}
        )
        self.dropout = nn.Dropout(config.dropout)
        self.out_dim = hidden * len(self.dims)

    def _gated(
        self, embeddings: Mapping[Modality, torch.Tensor], presence: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        flags = _presence_columns(self.dims, presence).to(next(iter(embeddings.values())).dtype)
        projected = [self.projections[m.value](embeddings[m]) for m in self.dims]
        gates = [
            torch.sigmoid(self.gates[m.value](torch.cat([p, flags], dim=1)))
            for m, p in zip(self.dims, projected)
        ]
        return projected, torch.cat(gates, dim=1)

    def gate_values(
        self, embeddings: Mapping[Modality, torch.Tensor], presence: torch.Tensor
    ) -> torch.Tensor:
        """Gates (batch, len(dims)) in `dims` order."""
        return self._gated(embeddings, presence)[1]

    def forward(
        self, embeddings: Mapping[Modality, torch.Tensor], presence: torch.Tensor
    ) -> torch.Tensor:
        """Gated concatenation (batch, hidden_size * modalities)."""
        projected, gates = self._gated(embeddings, presence)
        parts = [gates[:, i : i + 1] * p for i, p in enumerate(projected)]
        return self.dropout(torch.cat(parts, dim=-1))


def build_fusion(config: FusionConfig, dims: Mapping[Modality, int]) -> Fusion:
    """Build the fusion module named by `config` for embeddings of sizes `dims`."""
    return FUSIONS.get(config.method)(dims, config)
