"""Imputation modules: fill the embeddings of absent modalities before fusion.

- ``zero``: zero vectors (the usual baseline).
- ``mean``: the training-set mean embedding of the modality (`fit` computes it).
- ``learned_token``: a learned vector per modality, zero-initialised.
- ``knn``: the mean of the k nearest training neighbours' embeddings of the missing modality,
  retrieved by a modality the sample has (exact cosine search in a `MemoryBank`); a training
  row never draws from its own group (`fit(groups=)`, `forward(exclude_groups=)`).
- ``translator``: a small network predicting the missing embedding from the present ones,
  trained with a regression + contrastive auxiliary loss on samples that have both sides.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mllm_missing.registry import Registry
from mllm_missing.strategies.imputation.config import ImputationConfig
from mllm_missing.types import MODALITY_ORDER, Modality

IMPUTATIONS: Registry[type[Imputation]] = Registry("imputation")
#: Folder of the knn imputation's memory bank inside a saved model.
KNN_BANK_FOLDER = "imputation_bank"


def _column(modality: Modality) -> int:
    return MODALITY_ORDER.index(modality)


class Imputation(nn.Module):
    """Base class: fills rows of absent modalities, leaves present rows untouched.

    Args:
        dims: embedding size of each modality the model uses.
        config: the imputation configuration.
    """

    #: One line saying what the module does (the scheduler shows it to its LLM).
    description: ClassVar[str] = ""

    def __init__(self, dims: Mapping[Modality, int], config: ImputationConfig | None = None):
        super().__init__()
        self.dims = {Modality.parse(k): int(v) for k, v in dims.items()}
        self.config = config or ImputationConfig(method=self._registered_name())

    @classmethod
    def _registered_name(cls) -> str:
        return next(n for n in IMPUTATIONS.names() if IMPUTATIONS.get(n) is cls)

    def stand_in(
        self,
        modality: Modality,
        embeddings: Mapping[Modality, torch.Tensor],
        presence: torch.Tensor,
    ) -> torch.Tensor:
        """The stand-in embeddings (batch, dim) of `modality`, used where it is absent.

        Args:
            modality: the modality to fill.
            embeddings: every modality of `dims`, absent rows zero.
            presence: bool (batch, 3) in `MODALITY_ORDER`.
        """
        raise NotImplementedError

    def fit(
        self,
        embeddings: Mapping[Modality, torch.Tensor],
        presence: torch.Tensor,
        groups: Sequence[str] | None = None,
    ) -> None:
        """Compute statistics from training embeddings (no-op unless the method needs any).

        Args:
            embeddings: modality -> (n, dim) training embeddings, absent rows anything.
            presence: bool (n, 3) in `MODALITY_ORDER`.
            groups: per training row, the group of rows sharing an input (only methods that
                retrieve keep it, to leave a training row's whole group out; see `forward`).
        """
        del embeddings, presence, groups

    def _stand_in_excluding(
        self,
        modality: Modality,
        embeddings: Mapping[Modality, torch.Tensor],
        presence: torch.Tensor,
        exclude_groups: Sequence[str | None] | None,
    ) -> torch.Tensor:
        """`stand_in`, with rows' own groups left out where the method retrieves (default:
        nothing is retrieved, so nothing to leave out)."""
        del exclude_groups
        return self.stand_in(modality, embeddings, presence)

    def auxiliary_loss(
        self, embeddings: Mapping[Modality, torch.Tensor], presence: torch.Tensor
    ) -> torch.Tensor | None:
        """An extra training loss of the imputation itself, or None."""
        del embeddings, presence
        return None

    def _complete(
        self, embeddings: Mapping[Modality, torch.Tensor], presence: torch.Tensor
    ) -> dict[Modality, torch.Tensor]:
        """Every modality of `dims` as (batch, dim), absent rows zeroed, shapes checked."""
        batch = presence.shape[0]
        reference = next(iter(embeddings.values()))
        out = {}
        for modality, dim in self.dims.items():
            given = embeddings.get(modality)
            if given is None:
                given = reference.new_zeros(batch, dim)
            elif given.shape != (batch, dim):
                raise ValueError(
                    f"{modality.value} embeddings have shape {tuple(given.shape)}, "
                    f"expected ({batch}, {dim})"
                )
            out[modality] = given * presence[:, _column(modality)].unsqueeze(1).to(given.dtype)
        return out

    def forward(
        self,
        embeddings: Mapping[Modality, torch.Tensor],
        presence: torch.Tensor,
        exclude_groups: Sequence[str | None] | None = None,
    ) -> dict[Modality, torch.Tensor]:
        """Return every modality of `dims` with absent rows replaced by `stand_in`.

        Args:
            embeddings: modality -> (batch, dim); a modality absent from the whole batch may be
                left out.
            presence: bool (batch, 3) in `MODALITY_ORDER`.
            exclude_groups: for rows of the data `fit` saw (training, held-out validation), each
                row's group, which a retrieving method (`knn`) must not draw neighbours from: a
                test sample's own input is never among them, so a training row's must not be.
        """
        if exclude_groups is not None and len(exclude_groups) != presence.shape[0]:
            raise ValueError(
                f"exclude_groups has {len(exclude_groups)} entries for {presence.shape[0]} rows"
            )
        complete = self._complete(embeddings, presence)
        out: dict[Modality, torch.Tensor] = {}
        for modality, given in complete.items():
            absent = ~presence[:, _column(modality)]
            if not bool(absent.any()):
                out[modality] = given
                continue
            # Stand-ins are computed for the absent rows only (a kNN search per row is not free).
            subset = {m: x[absent] for m, x in complete.items()}
            filled = given.clone()
            groups = None
            if exclude_groups is not None:
                groups = [exclude_groups[i] for i in absent.nonzero().flatten().tolist()]
            stand_in = self._stand_in_excluding(modality, subset, presence[absent], groups)
            filled[absent] = stand_in.to(given.dtype)
            out[modality] = filled
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters this module trains."""
        return [p for p in self.parameters() if p.requires_grad]

    def save_files(self, folder: Path) -> None:
        """Write what the state dict cannot hold into a saved model's `folder` (default: none)."""
        del folder

    def load_files(self, folder: Path) -> None:
        """Read what `save_files` wrote."""
        del folder


@IMPUTATIONS.register("zero")
class ZeroImputation(Imputation):
    """Absent embeddings become zero vectors (the usual baseline)."""

    description = "fills an absent embedding with zeros (the usual baseline)"

    def stand_in(
        self,
        modality: Modality,
        embeddings: Mapping[Modality, torch.Tensor],
        presence: torch.Tensor,
    ) -> torch.Tensor:
        return torch.zeros_like(embeddings[modality])


@IMPUTATIONS.register("mean")
class MeanImputation(Imputation):
    """Absent embeddings become the training-set mean of the modality (call `fit` first)."""

    description = "fills an absent embedding with the training-set mean of that modality"

    fitted: torch.Tensor

    def __init__(self, dims: Mapping[Modality, int], config: ImputationConfig | None = None):
        super().__init__(dims, config)
        for modality, dim in self.dims.items():
            self.register_buffer(f"mean_{modality.value}", torch.zeros(dim))
        self.register_buffer("fitted", torch.tensor(False))

    def fit(
        self,
        embeddings: Mapping[Modality, torch.Tensor],
        presence: torch.Tensor,
        groups: Sequence[str] | None = None,
    ) -> None:
        """Average each modality over the training rows that have it (`groups` unused)."""
        del groups
        for modality in self.dims:
            rows = presence[:, _column(modality)]
            if not bool(rows.any()):
                raise ValueError(f"cannot fit the mean of {modality.value}: no row has it")
            mean = embeddings[modality][rows].float().mean(dim=0)
            getattr(self, f"mean_{modality.value}").copy_(mean)
        self.fitted.fill_(True)

    def stand_in(
        self,
        modality: Modality,
        embeddings: Mapping[Modality, torch.Tensor],
        presence: torch.Tensor,
    ) -> torch.Tensor:
        if not bool(self.fitted):
            raise RuntimeError("mean imputation is used before fit(); call fit on training data")
        mean = getattr(self, f"mean_{modality.value}").to(embeddings[modality].dtype)
        return mean.unsqueeze(0).expand_as(embeddings[modality])


@IMPUTATIONS.register("learned_token")
class LearnedTokenImputation(Imputation):
    """Absent embeddings become a learned vector per modality (zero-initialised, so it starts
    exactly as zero fill and learns the stand-in that serves the task best)."""

    description = "fills an absent embedding with a learned vector per modality"

    def __init__(self, dims: Mapping[Modality, int], config: ImputationConfig | None = None):
        super().__init__(dims, config)
        self.tokens = nn.ParameterDict(
            {m.value: nn.Parameter(torch.zeros(d)) for m, d in self.dims.items()}
        )

    def stand_in(
        self,
        modality: Modality,
        embeddings: Mapping[Modality, torch.Tensor],
        presence: torch.Tensor,
    ) -> torch.Tensor:
        token = self.tokens[modality.value].to(embeddings[modality].dtype)
        return token.unsqueeze(0).expand_as(embeddings[modality])


@IMPUTATIONS.register("translator")
class TranslatorImputation(Imputation):
    """Predict a missing embedding from the present ones with a small MLP per target modality.

    The input of the translator for modality m is every other modality's embedding (zero where
    absent) and their presence flags. `auxiliary_loss` trains it on rows that have m and at
    least one other modality: mean-squared error to the true embedding plus an InfoNCE term that
    makes the prediction closer to its own sample's embedding than to the others in the batch.
    """

    description = "predicts an absent embedding from the present ones with a small trained network"

    def __init__(self, dims: Mapping[Modality, int], config: ImputationConfig | None = None):
        super().__init__(dims, config)
        if len(self.dims) < 2:
            raise ValueError("translator imputation needs at least two modalities")
        hidden = self.config.hidden_size
        self.translators = nn.ModuleDict()
        for target, dim in self.dims.items():
            sources = sum(d for m, d in self.dims.items() if m != target) + len(self.dims) - 1
            self.translators[target.value] = nn.Sequential(
                nn.Linear(sources, hidden), nn.GELU(), nn.Linear(hidden, dim)
            )

    def _sources(
        self, target: Modality, embeddings: Mapping[Modality, torch.Tensor], presence: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        others = [m for m in self.dims if m != target]
        flags = torch.stack([presence[:, _column(m)] for m in others], dim=1)
        features = torch.cat(
            [embeddings[m] for m in others] + [flags.to(embeddings[target].dtype)], 1
        )
        return features, flags.any(dim=1)

    def stand_in(
        self,
        modality: Modality,
        embeddings: Mapping[Modality, torch.Tensor],
        presence: torch.Tensor,
    ) -> torch.Tensor:
        features, _ = self._sources(modality, embeddings, presence)
        return self.translators[modality.value](features)

    def auxiliary_loss(
        self, embeddings: Mapping[Modality, torch.Tensor], presence: torch.Tensor
    ) -> torch.Tensor | None:
        complete = self._complete(embeddings, presence)
        losses = []
        for target in self.dims:
            features, has_source = self._sources(target, complete, presence)
            rows = has_source & presence[:, _column(target)]
            if int(rows.sum()) < 2:
                continue
            predicted = self.translators[target.value](features[rows])
            truth = complete[target][rows]
            regression = F.mse_loss(predicted, truth)
            logits = F.normalize(predicted, dim=1) @ F.normalize(truth, dim=1).T
            labels = torch.arange(logits.shape[0], device=logits.device)
            contrastive = F.cross_entropy(logits / self.config.temperature, labels)
            losses.append(regression + self.config.contrastive_weight * contrastive)
        return torch.stack(losses).mean() if losses else None


@IMPUTATIONS.register("knn")
class KnnImputation(Imputation):
    """Absent embeddings become the mean of the k nearest training neighbours' embeddings of
    that modality, retrieved by cosine similarity on a modality the sample has.

    `fit` builds the memory bank from the training rows (only modalities a row has enter the
    bank, so a sample never lends its own hidden input). The bank is not part of the state dict:
    a saved model keeps it in ``imputation_bank/`` (`save_files`), memory-mapped back on load.
    """

    description = (
        "fills an absent embedding with the mean of the nearest training neighbours' embeddings"
    )

    def __init__(self, dims: Mapping[Modality, int], config: ImputationConfig | None = None):
        super().__init__(dims, config)
        if len(self.dims) < 2:
            raise ValueError("knn imputation needs at least two modalities")
        self.bank: Any = None

    def fit(
        self,
        embeddings: Mapping[Modality, torch.Tensor],
        presence: torch.Tensor,
        groups: Sequence[str] | None = None,
    ) -> None:
        """Build the memory bank of the training embeddings (rows with at least one modality),
        keeping each row's group when given, so `forward(..., exclude_groups=)` can leave a
        training row's whole group out (a bank without groups ignores `exclude_groups`)."""
        from mllm_missing.strategies.retrieval import MemoryBankConfig, index_rows

        self.bank = index_rows(
            [str(i) for i in range(len(presence))],
            {m: embeddings[m] for m in self.dims},
            presence,
            MemoryBankConfig(k=self.config.k, source="knn imputation fit"),
            groups=groups,
        )

    def _stand_in_excluding(
        self,
        modality: Modality,
        embeddings: Mapping[Modality, torch.Tensor],
        presence: torch.Tensor,
        exclude_groups: Sequence[str | None] | None,
    ) -> torch.Tensor:
        if self.bank is None:
            raise RuntimeError("knn imputation is used before fit(); call fit on training data")
        if not self.bank.grouped:
            # A bank saved before groups were kept: its model trained without the leave-out, and
            # its entry ids are row numbers, which a group name must not be matched against.
            exclude_groups = None
        reference = embeddings[modality]
        filled = self.bank.impute(modality, embeddings, presence, exclude_groups=exclude_groups)
        return filled.to(reference)

    def stand_in(
        self,
        modality: Modality,
        embeddings: Mapping[Modality, torch.Tensor],
        presence: torch.Tensor,
    ) -> torch.Tensor:
        return self._stand_in_excluding(modality, embeddings, presence, None)

    def save_files(self, folder: Path) -> None:
        """The memory bank, in ``imputation_bank/``."""
        if self.bank is None:
            raise RuntimeError("knn imputation has no memory bank to save; call fit first")
        self.bank.save(Path(folder) / KNN_BANK_FOLDER)

    def load_files(self, folder: Path) -> None:
        """Memory-map the bank back."""
        from mllm_missing.strategies.retrieval import MemoryBank

        path = Path(folder) / KNN_BANK_FOLDER
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no memory bank (knn imputation needs it)")
        self.bank = MemoryBank.load(path, mmap=True)


def build_imputation(config: ImputationConfig, dims: Mapping[Modality, int]) -> Imputation:
    """Build the imputation module named by `config` for embeddings of sizes `dims`."""
    return IMPUTATIONS.get(config.method)(dims, config)
