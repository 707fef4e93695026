"""Task heads and the small model that sits on frozen embeddings: imputation -> fusion -> head."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mllm_missing.data.base import TaskType
from mllm_missing.strategies.fusion import Fusion
from mllm_missing.strategies.imputation import Imputation
from mllm_missing.types import MODALITY_ORDER, Modality, presence_codes

__all__ = [
    "ClassificationHead",
    "EmbeddingClassifier",
    "PatternRoutedHead",
    "impute_once",
    "task_loss",
]


class ClassificationHead(nn.Module):
    """A two-layer MLP producing one logit per label (one logit for binary tasks).

    Args:
        in_dim: input width.
        num_labels: output width.
        hidden_size: hidden width.
        dropout: dropout before the output layer.
    """

    def __init__(self, in_dim: int, num_labels: int, hidden_size: int = 256, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_size),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_size, num_labels),
        )

    def forward(self, features: torch.Tensor, presence: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (batch, num_labels); `presence` is unused (one head for every pattern)."""
        del presence
        return self.net(features)


class PatternRoutedHead(nn.Module):
    """Missing-aware head: one `ClassificationHead` per presence pattern, each sample scored by
    the head of its own pattern (the idea of MAP's per-case prompts and MoRA's per-case adapters,
    applied at the head). The complete pattern gets parameters that single-modality samples never
    pull towards prior-guessing.

    Args:
        in_dim: input width.
        num_labels: output width.
        modalities: the dataset's modalities; one head per non-empty subset.
        hidden_size: hidden width of every head.
        dropout: dropout before each output layer.
    """

    def __init__(
        self,
        in_dim: int,
        num_labels: int,
        modalities: Sequence[Modality],
        hidden_size: int = 256,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.columns = [MODALITY_ORDER.index(Modality.parse(m)) for m in modalities]
        self.num_labels = num_labels
        codes = range(1, 2 ** len(self.columns))
        self.heads = nn.ModuleDict(
            {str(c): ClassificationHead(in_dim, num_labels, hidden_size, dropout) for c in codes}
        )

    def pattern_codes(self, presence: torch.Tensor) -> torch.Tensor:
        """Per-row pattern code: bit i set when the i-th modality of the head is present."""
        return presence_codes(presence, [MODALITY_ORDER[c] for c in self.columns])

    def forward(self, features: torch.Tensor, presence: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (batch, num_labels), each row from the head of its presence pattern."""
        if presence is None:
            raise ValueError("a pattern-routed head needs the presence mask")
        codes = self.pattern_codes(presence)
        if bool((codes == 0).any()):
            raise ValueError("a sample has none of the head's modalities")
        out = features.new_zeros(features.shape[0], self.num_labels)
        for code in codes.unique().tolist():
            rows = codes == code
            out[rows] = self.heads[str(code)](features[rows])
        return out


class EmbeddingClassifier(nn.Module):
    """Frozen embeddings in, logits out: imputation fills absent modalities, fusion combines.

    Args:
        imputation: fills absent modality embeddings.
        fusion: combines per-modality embeddings.
        head: maps the fused representation to logits.
    """

    def __init__(
        self, imputation: Imputation, fusion: Fusion, head: ClassificationHead | PatternRoutedHead
    ):
        super().__init__()
        self.imputation = imputation
        self.fusion = fusion
        self.head = head

    def forward(
        self,
        embeddings: Mapping[Modality, torch.Tensor],
        presence: torch.Tensor,
        imputed: bool = False,
    ) -> torch.Tensor:
        """Logits for a batch of embeddings and its presence (bool, batch x 3).

        Args:
            embeddings: modality -> (batch, dim), absent rows zero (or already imputed).
            presence: bool (batch, 3) in `MODALITY_ORDER`.
            imputed: the embeddings were already passed through `self.imputation` (a fixed,
                untrained imputation can be applied once to frozen features, see `impute_once`).
        """
        if not bool(presence.any(dim=1).all()):
            raise ValueError("a sample has every modality missing; nothing to predict from")
        filled = dict(embeddings) if imputed else self.imputation(embeddings, presence)
        return self.head(self.fusion(filled, presence), presence)


@torch.no_grad()
def impute_once(
    imputation: Imputation,
    embeddings: Mapping[Modality, torch.Tensor],
    presence: torch.Tensor,
    chunk: int = 4096,
    exclude_groups: Sequence[str | None] | None = None,
) -> dict[Modality, torch.Tensor] | None:
    """Apply an imputation with no trainable parameters to a whole split once, in chunks.

    Frozen features and a fixed imputation (zero, mean, knn) give the same filled embeddings every
    epoch, so they are computed once. Returns None for imputations that train (their output
    changes as they learn, so they must run per batch). `exclude_groups`: on the split the
    imputation was fitted on, each row's group, which a retrieving imputation leaves out.
    """
    if imputation.trainable_parameters():
        return None
    parts = []
    for rows in torch.arange(presence.shape[0]).split(chunk):
        groups = None if exclude_groups is None else [exclude_groups[r] for r in rows.tolist()]
        parts.append(
            imputation({m: x[rows] for m, x in embeddings.items()}, presence[rows], groups)
        )
    return {m: torch.cat([p[m] for p in parts]) for m in parts[0]}


def task_loss(task_type: TaskType, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for multi-class, binary cross-entropy with logits otherwise."""
    if task_type is TaskType.MULTICLASS:
        return F.cross_entropy(logits, labels.long())
    if task_type is TaskType.BINARY:
        return F.binary_cross_entropy_with_logits(logits.squeeze(-1), labels.float())
    return F.binary_cross_entropy_with_logits(logits, labels.float())
