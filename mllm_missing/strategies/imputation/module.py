"""Imputation modules: zero fill and a learned per-modality missing token."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mllm_missing.registry import Registry
from mllm_missing.strategies.imputation.config import ImputationConfig
from mllm_missing.types import MODALITY_ORDER, Modality

IMPUTATIONS: Registry[type[Imputation]] = Registry("imputation")


class Imputation(nn.Module):
    """Base class: fills rows of absent modalities, leaves present rows untouched.

    Args:
        dims: embedding size of each modality the model uses.
    """

    def __init__(self, dims: Mapping[Modality, int]) -> None:
        super().__init__()
        self.dims = {Modality.parse(k): int(v) for k, v in dims.items()}

    def fill(self, modality: Modality, batch_size: int, like: torch.Tensor) -> torch.Tensor:
        """The stand-in embeddings (batch_size, dim) for absent rows of `modality`."""
        raise NotImplementedError

    def forward(
        self, embeddings: Mapping[Modality, torch.Tensor], presence: torch.Tensor
    ) -> dict[Modality, torch.Tensor]:
        """Return every modality of `dims` with absent rows replaced by `fill`.

        Args:
            embeddings: modality -> (batch, dim); a modality absent from the whole batch may be
                left out.
            presence: bool (batch, 3) in `MODALITY_ORDER`.
        """
        batch = presence.shape[0]
        out: dict[Modality, torch.Tensor] = {}
        reference = next(iter(embeddings.values()))
        for modality, dim in self.dims.items():
            present = presence[:, MODALITY_ORDER.index(modality)].unsqueeze(1)
            given = embeddings.get(modality)
            if given is None:
                given = reference.new_zeros(batch, dim)
            elif given.shape != (batch, dim):
                raise ValueError(
                    f"{modality.value} embeddings have shape {tuple(given.shape)}, "
                    f"expected ({batch}, {dim})"
                )
            out[modality] = torch.where(present, given, self.fill(modality, batch, given))
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters this module trains."""
        return [p for p in self.parameters() if p.requires_grad]


@IMPUTATIONS.register("zero")
class ZeroImputation(Imputation):
    """Absent embeddings become zero vectors (the usual baseline)."""

    def fill(self, modality: Modality, batch_size: int, like: torch.Tensor) -> torch.Tensor:
        return like.new_zeros(batch_size, self.dims[modality])


@IMPUTATIONS.register("learned_token")
class LearnedTokenImputation(Imputation):
    """Absent embeddings become a learned vector per modality (zero-initialised, so it starts
    exactly as zero fill and learns the stand-in that serves the task best)."""

    def __init__(self, dims: Mapping[Modality, int]) -> None:
        super().__init__(dims)
        self.tokens = nn.ParameterDict(
            {m.value: nn.Parameter(torch.zeros(d)) for m, d in self.dims.items()}
        )

    def fill(self, modality: Modality, batch_size: int, like: torch.Tensor) -> torch.Tensor:
        token = self.tokens[modality.value].to(like.dtype)
        return token.unsqueeze(0).expand(batch_size, -1)


def build_imputation(config: ImputationConfig, dims: Mapping[Modality, int]) -> Imputation:
    """Build the imputation module named by `config` for embeddings of sizes `dims`."""
    return IMPUTATIONS.get(config.method)(dims)
