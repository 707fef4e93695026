"""Retrieval-augmented prompts (RAGPT): the missing modality's retrieved stand-in becomes prompts.

For each sample and each modality it lacks, the k nearest training samples are retrieved by a
modality it has (exact cosine search in a `MemoryBank` of the frozen backbone's embeddings of the
training split, leave-one-out there), and the mean of their embeddings of the lacking modality
is its stand-in. A small generator (an MLP per prompted tower) turns the stand-ins into prompt
tokens, added to a learned prompt set per missing case (MAP's), so a complete sample gets its
case prompts and an incomplete one prompts that also carry what its neighbours had.

With ``label_context``, the generator also reads, for every modality a sample has, the mean
label of its k nearest training samples by that modality (RAGPT's label-enhanced prompt), so
complete samples are retrieval-augmented too. On the training split a row never retrieves a
sample of its own group (the other questions about its image): a test row never finds its own
image in the bank either, and its neighbours' labels would otherwise hand it its answer.

The stand-ins (and label means) are the strategy's *retrieval context*: `retrieval_context`
computes them for a batch from the rows' frozen embeddings, and `encode` takes them next to the
presence mask (the training, evaluation and inference paths pass them; see
`mllm_missing.training.data`). The memory bank is saved with the strategy's weights and
memory-mapped back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mllm_missing.backbones.base import Backbone, EncoderOutput
from mllm_missing.errors import ConfigError
from mllm_missing.strategies.base import case_codes, case_names
from mllm_missing.strategies.prompting import PromptStrategy
from mllm_missing.strategies.rag_prompts.config import RagPromptsConfig
from mllm_missing.strategies.retrieval import MemoryBank, MemoryBankConfig, index_rows
from mllm_missing.types import MODALITY_ORDER, Modality

__all__ = ["BANK_FOLDER", "RagPrompts"]

#: Folder of the memory bank inside a saved model.
BANK_FOLDER = "memory_bank"


class RagPrompts(PromptStrategy):
    """Per-case prompts plus prompts generated from retrieved stand-ins of missing modalities.

    Args:
        config: the strategy's config.
        backbone: the frozen backbone (its embedding widths size the retrieval context).
        modalities: the dataset's modalities (the cases and the stand-ins are built over these).
        num_labels: the task's label count (the width of a label mean); needed with
            ``label_context``.
    """

    config: RagPromptsConfig
    retrieves = True
    takes_num_labels = True

    def __init__(
        self,
        config: RagPromptsConfig,
        backbone: Backbone,
        modalities: Sequence[Modality],
        num_labels: int | None = None,
    ) -> None:
        super().__init__(config, backbone, modalities)
        if config.label_context and not num_labels:
            raise ConfigError(
                "strategy.label_context needs the task's number of labels: build the model "
                "with build_model, or the strategy with build_strategy(..., num_labels=N)"
            )
        self.label_dim = int(num_labels or 0) if config.label_context else 0
        if len(self.data_modalities) < 2:
            raise ValueError("rag_prompts needs at least two modalities to retrieve one by another")
        lacking = [m.value for m in self.data_modalities if m not in backbone.modalities]
        if lacking:
            raise ConfigError(
                f"rag_prompts retrieves every dataset modality by the others, but the backbone "
                f"{backbone.name!r} has no {', '.join(lacking)} tower to embed it"
            )
        self.cases = case_names(self.data_modalities)
        self.stand_in_dims = {m: backbone.embed_dim(m) for m in self.data_modalities}
        self.case_prompts = nn.ParameterDict()
        self.generators = nn.ModuleDict()
        for m in self.towers:
            shape = (len(self.blocks[m]), *self.token_shape(m, config.prompt_length))
            self.case_prompts[m.value] = self.new_parameter(len(self.cases), *shape)
            out = nn.Linear(config.hidden_size, math.prod(shape))
            nn.init.zeros_(out.bias)
            if config.init == "zero":
                nn.init.zeros_(out.weight)  # an exact no-op until trained
            else:
                nn.init.normal_(out.weight, std=config.init_std)
            self.generators[m.value] = nn.Sequential(
                nn.Linear(self.context_dim, config.hidden_size), nn.GELU(), out
            )
        self.bank: MemoryBank | None = None

    @property
    def context_dim(self) -> int:
        """Width of a row's retrieval context: one stand-in slot per dataset modality, then
        (with ``label_context``) one label-mean slot per dataset modality."""
        return sum(self.stand_in_dims.values()) + self.label_dim * len(self.data_modalities)

    def fit_retrieval(
        self,
        embeddings: Mapping[Modality, torch.Tensor],
        presence: torch.Tensor,
        ids: Sequence[str],
        *,
        groups: Sequence[str] | None = None,
        labels: torch.Tensor | None = None,
    ) -> None:
        """Build the memory bank from the training split's frozen embeddings.

        Only the modalities a row has enter the bank, so a sample never lends an input that is
        hidden from it; rows with none of the dataset's modalities are left out. `groups`
        (rows sharing an input) are left out together in leave-one-out; `labels` are kept
        with ``label_context``. With ``retrieval: false`` nothing is built.

        Raises:
            ValueError: embeddings of a modality are missing, or ``label_context`` is on and
                `labels` are missing or of the wrong width.
        """
        if not self.config.retrieval:
            return
        missing = [m.value for m in self.data_modalities if m not in embeddings]
        if missing:
            raise ValueError(f"rag_prompts: no training embeddings of {', '.join(missing)}")
        self.bank = index_rows(
            ids,
            {m: embeddings[m] for m in self.data_modalities},
            presence,
            MemoryBankConfig(
                k=self.config.k,
                dtype=self.config.bank_dtype,
                source=f"rag_prompts: frozen embeddings of {len(ids)} training rows",
            ),
            groups=groups,
            labels=self._label_rows(labels, len(ids)) if self.label_dim else None,
        )

    def _label_rows(self, labels: torch.Tensor | None, rows: int) -> torch.Tensor:
        """Training targets as (rows, `label_dim`) floats: class indices become one-hot."""
        if labels is None:
            raise ValueError("rag_prompts with label_context needs the training labels")
        labels = torch.as_tensor(labels)
        if labels.ndim == 1 and not labels.is_floating_point() and self.label_dim > 1:
            if bool(((labels < 0) | (labels >= self.label_dim)).any()):
                raise ValueError(f"rag_prompts: class labels must lie in [0, {self.label_dim})")
            labels = F.one_hot(labels.long(), self.label_dim)
        labels = labels.float().reshape(rows, -1)
        if labels.shape[1] != self.label_dim:
            raise ValueError(
                f"rag_prompts: labels have {labels.shape[1]} columns, the task has "
                f"{self.label_dim} labels"
            )
        return labels

    def retrieval_context(
        self,
        embeddings: Mapping[Modality, torch.Tensor],
        presence: torch.Tensor,
        exclude_groups: Sequence[str | None] | None = None,
    ) -> torch.Tensor:
        """(batch, `context_dim`): per dataset modality, the L2-normalised mean of the retrieved
        neighbours' embeddings where the row lacks it, zeros where it has it; then, with
        ``label_context``, per dataset modality the mean label of the row's k nearest entries
        by it where the row has it, zeros where it lacks it.

        A lacking modality of a row with no other modality, or with no bank entry to retrieve
        (fewer candidates than one), keeps zeros: the generator then adds nothing to the case
        prompts. With ``retrieval: false`` the context is all zeros.

        Raises:
            RuntimeError: retrieval is on and no memory bank was fitted or loaded.
        """
        presence = presence.cpu()
        slots = []
        for m in self.data_modalities:
            slot = torch.zeros(presence.shape[0], self.stand_in_dims[m])
            others = [o for o in self.data_modalities if o != m]
            wanted = ~presence[:, _column(m)] & presence[:, [_column(o) for o in others]].any(1)
            if self.config.retrieval and bool(wanted.any()):
                rows = wanted.nonzero().flatten()
                slot[rows] = self._stand_ins(m, rows, embeddings, presence, exclude_groups)
            slots.append(slot)
        if self.label_dim:
            slots.extend(self._label_slots(embeddings, presence, exclude_groups))
        return torch.cat(slots, dim=1)

    def _label_slots(
        self,
        embeddings: Mapping[Modality, torch.Tensor],
        presence: torch.Tensor,
        exclude_groups: Sequence[str | None] | None,
    ) -> list[torch.Tensor]:
        """Per dataset modality, (batch, `label_dim`): the label mean of each row's k nearest
        bank entries by that modality where the row has it, else zeros."""
        slots = []
        for m in self.data_modalities:
            slot = torch.zeros(presence.shape[0], self.label_dim)
            rows = presence[:, _column(m)].nonzero().flatten()
            if self.config.retrieval and len(rows):
                bank = self._fitted_bank()
                picked = rows.tolist()
                exclude = None if exclude_groups is None else [exclude_groups[i] for i in picked]
                queries = embeddings[m][rows.to(embeddings[m].device)].detach().float().cpu()
                _, indices = bank.search(queries, m, exclude_groups=exclude)
                slot[rows] = bank.neighbour_labels(indices).cpu()
            slots.append(slot)
        return slots

    def _fitted_bank(self) -> MemoryBank:
        if self.bank is None:
            raise RuntimeError(
                "rag_prompts has no memory bank: call fit_retrieval on the training split's "
                "frozen embeddings, or load a saved model (its memory_bank folder)"
            )
        if self.label_dim and self.bank.label_dim != self.label_dim:
            raise RuntimeError(
                f"rag_prompts: label_context needs a memory bank with {self.label_dim} label "
                f"columns; this one has {self.bank.label_dim}"
            )
        return self.bank

    def _stand_ins(
        self,
        target: Modality,
        rows: torch.Tensor,
        embeddings: Mapping[Modality, torch.Tensor],
        presence: torch.Tensor,
        exclude_groups: Sequence[str | None] | None,
    ) -> torch.Tensor:
        bank = self._fitted_bank()
        picked = rows.tolist()
        exclude = None if exclude_groups is None else [exclude_groups[i] for i in picked]
        subset = {m: x[rows.to(x.device)] for m, x in embeddings.items()}
        imputed = bank.impute(target, subset, presence[rows], exclude_groups=exclude)
        return F.normalize(imputed, dim=1)

    def tokens(self, modality: Modality, presence: torch.Tensor) -> torch.Tensor:
        """Not available without the retrieval context: use `context_tokens`."""
        raise ValueError(
            "rag_prompts needs each row's retrieval context next to its presence; call "
            "encode(..., context=strategy.retrieval_context(...))"
        )

    def context_tokens(
        self, modality: Modality, presence: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        """Each sample's tokens (batch, blocks, *token_shape): its case prompts plus the
        generator's prompts from its retrieval context."""
        if context.shape != (presence.shape[0], self.context_dim):
            raise ValueError(
                f"rag_prompts: the retrieval context has shape {tuple(context.shape)}, expected "
                f"({presence.shape[0]}, {self.context_dim})"
            )
        table = self.case_prompts[modality.value]
        codes = case_codes(presence, self.data_modalities).to(table.device)
        generated = self.generators[modality.value](context.to(table.device, table.dtype))
        return table[codes] + generated.view(-1, *table.shape[1:])

    def encode(
        self,
        backbone: Backbone,
        modality: Modality,
        inputs: dict[str, torch.Tensor],
        presence: torch.Tensor,
        context: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """Run `modality`'s tower with the rows' prompts (`context` is required)."""
        modality = Modality.parse(modality)
        if not self.adapts(modality):
            return backbone.encode(modality, inputs)
        if context is None:
            raise ValueError(
                "rag_prompts needs each row's retrieval context: pass "
                "context=strategy.retrieval_context(frozen embeddings, presence)"
            )
        tokens = self.context_tokens(modality, presence, context)
        return backbone.encode(modality, inputs, self.layer_prompts(modality, tokens, presence))

    def save_files(self, directory: Any) -> None:
        """The weights, and the memory bank in ``memory_bank/`` when retrieval is on."""
        super().save_files(directory)
        if self.config.retrieval:
            if self.bank is None:
                raise RuntimeError("rag_prompts: nothing to save as memory bank; fit it first")
            self.bank.save(Path(directory) / BANK_FOLDER)

    def load_files(self, directory: Any) -> None:
        """Read the weights and memory-map the memory bank."""
        super().load_files(directory)
        if self.config.retrieval:
            path = Path(directory) / BANK_FOLDER
            if not path.is_dir():
                raise FileNotFoundError(f"{path}: no memory bank (rag_prompts needs it)")
            self.bank = MemoryBank.load(path, mmap=True)


def _column(modality: Modality) -> int:
    return MODALITY_ORDER.index(modality)
