"""A split ready for training: labels, the seeded presence table, frozen features, raw inputs.

Towers the strategy does not adapt are encoded once per distinct input (cached on disk). For
adapted towers, each batch encodes each distinct (input, missing case) pair once: easy-VQA's
35,000 training questions hold 107 distinct texts, so a step costs at most a few hundred tower
rows whatever the batch size. Absent rows of adapted towers get a placeholder input (`placeholder`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mllm_missing.backbones.features import encode_column
from mllm_missing.data.base import TaskInfo, cache_root
from mllm_missing.missing import MissingConfig, get_mask_table
from mllm_missing.model import MissingModalityModel
from mllm_missing.types import MODALITY_ORDER, Modality, presence_codes

__all__ = [
    "SplitData",
    "embed_rows",
    "exclusion_groups",
    "load_split",
    "placeholder",
    "retrieval_context",
    "row_groups",
]


@dataclass
class SplitData:
    """One split of a task, with the presence every method sees.

    Attributes:
        name: split name (as in mask-table paths).
        dataset: the Hugging Face dataset.
        ids: sample ids.
        labels: targets (long for multi-class, float otherwise).
        presence: bool (n, 3) from the seeded mask table.
        keys: modality -> per-row key of the input (equal keys, equal inputs).
        features: modality -> (n, dim) frozen embeddings, absent rows zero (unadapted towers).
        frozen: modality -> (n, dim) frozen embeddings of the adapted towers, absent rows zero,
            kept only for a strategy that retrieves (its queries are frozen embeddings).
        groups: per row, the group of rows that share an input (easy-VQA's questions about
            one image share its image id; elsewhere each row is its own group), which
            leave-one-out retrieval on the training split leaves out together.
    """

    name: str
    dataset: Any
    ids: list[str]
    labels: torch.Tensor
    presence: torch.Tensor
    keys: dict[Modality, list[str]]
    features: dict[Modality, torch.Tensor] = field(default_factory=dict)
    frozen: dict[Modality, torch.Tensor] = field(default_factory=dict)
    groups: list[str] = field(default_factory=list)
    _first_row: dict[Modality, dict[str, int]] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    def frozen_embeddings(self, rows: torch.Tensor) -> dict[Modality, torch.Tensor]:
        """Frozen embeddings for `rows` (absent rows zero) of every tower that has them: the
        retrieval queries (every tower when the strategy retrieves)."""
        frozen = {**self.frozen, **self.features}
        return {m: frozen[m][rows] for m in self.keys if m in frozen}

    def raw(self, modality: Modality, key: str) -> Any:
        """The raw input (PIL image, string, waveform) behind `key`."""
        rows = self._first_row.setdefault(modality, {})
        if not rows:
            for row, value in enumerate(self.keys[modality]):
                rows.setdefault(value, row)
        return self.dataset[rows[key]][modality.value]


def placeholder(modality: Modality) -> Any:
    """The stand-in input of an absent modality: a text of one full stop (the towers refuse an
    empty string), a grey image, 1 s of silence."""
    if modality is Modality.TEXT:
        return "."
    if modality is Modality.IMAGE:
        from PIL import Image

        return Image.new("RGB", (224, 224), (128, 128, 128))
    return np.zeros(16000, dtype=np.float32)


def row_groups(dataset: Any, ids: list[str]) -> list[str]:
    """Per row, its group of rows that share an input: the image id where the dataset has one
    (easy-VQA's questions about one image), else the row's own id."""
    if "image_id" in dataset.column_names:
        return [str(g) for g in dataset["image_id"]]
    return list(ids)


def _key_column(dataset: Any, modality: Modality) -> str:
    if modality is Modality.IMAGE and "image_id" in dataset.column_names:
        return "image_id"
    if modality is Modality.TEXT:
        return "text"
    return "id"


def load_split(
    dataset: Any,
    name: str,
    task: TaskInfo,
    missing: MissingConfig,
    model: MissingModalityModel,
    *,
    mask_root: Path,
    cache_dir: str | None,
    cache_tag: str,
) -> SplitData:
    """Build a `SplitData`: mask table, labels, and features of the towers the model does not adapt
    (of every tower when its strategy retrieves: adapted towers' go to `SplitData.frozen`).

    Args:
        dataset: the split's dataset (columns id, one per modality, label).
        name: split name used in mask-table and cache paths.
        task: the task.
        missing: the split's missing setting.
        model: the model (its strategy decides which towers are cacheable).
        mask_root: root of the mask tables.
        cache_dir: feature cache root.
        cache_tag: identifies backbone settings in cache file names.
    """
    ids = [str(i) for i in dataset["id"]]
    table = get_mask_table(missing, task.name, name, ids, task.modalities, mask_root)
    presence = torch.from_numpy(table.presence_tensor_rows())
    labels = torch.as_tensor(np.asarray(dataset["label"]))
    labels = labels.long() if task.task_type.value == "multiclass" else labels.float()
    keys = {m: [str(k) for k in dataset[_key_column(dataset, m)]] for m in task.modalities}
    split = SplitData(name, dataset, ids, labels, presence, keys, groups=row_groups(dataset, ids))
    feature_dir = cache_root(cache_dir) / "features"
    backbone = model.backbone
    for m in task.modalities:
        adapted = model.strategy.adapts(m)
        if adapted and not model.strategy.retrieves:
            continue
        present = presence[:, MODALITY_ORDER.index(m)].unsqueeze(1)

        def encode(raw: list[Any], m: Modality = m) -> torch.Tensor:
            return backbone.embed(m, list(raw)).float().cpu()

        # Every distinct input of the split is encoded (and cached) whatever the mask, so one
        # cache serves every missing setting; absent rows are zeroed right after.
        column = encode_column(
            dataset,
            m.value,
            encode,
            key_column=_key_column(dataset, m),
            cache_path=feature_dir / f"{cache_tag}-{m.value}-{task.name}-{name}.st",
            batch_size=64,
            desc=f"{name} {m.value}",
        )
        features = column.lookup(keys[m]) * present
        (split.frozen if adapted else split.features)[m] = features
    return split


def exclusion_groups(split: SplitData, rows: torch.Tensor) -> list[str] | None:
    """The groups that `rows` must not retrieve from an index fitted on the training split:
    their own, on the training split (itself and the rows sharing its input) and on the
    validation split (either held out of train, as easy-VQA's, which shares train's images, or
    one whose group names, its sample ids, no training row has). None on any other split: a
    test row's own input is never in the index."""
    if split.name not in ("train", "val"):
        return None
    return [split.groups[r] for r in rows.tolist()]


def retrieval_context(
    model: MissingModalityModel, split: SplitData, rows: torch.Tensor
) -> torch.Tensor | None:
    """The strategy's retrieval context of `rows` (None unless it retrieves), each row's own
    group left out (`exclusion_groups`)."""
    if not model.strategy.retrieves:
        return None
    return model.strategy.retrieval_context(
        split.frozen_embeddings(rows), split.presence[rows], exclusion_groups(split, rows)
    )


def embed_rows(
    model: MissingModalityModel, split: SplitData, rows: torch.Tensor
) -> dict[Modality, torch.Tensor]:
    """Per-modality embeddings of `rows`: cached features, or the adapted tower's output with
    each distinct (input, missing case) pair encoded once."""
    presence = split.presence[rows]
    device = next(iter(model.parameters())).device
    out: dict[Modality, torch.Tensor] = {}
    context = retrieval_context(model, split, rows)
    # Rows with equal retrieval context share an id, so equal (input, case, context) encode once.
    contexts = [0] * len(rows)
    if context is not None:
        contexts = torch.unique(context, dim=0, return_inverse=True)[1].tolist()
    for m in model.modalities:
        if m in split.features:
            out[m] = split.features[m][rows].to(device)
            continue
        column = MODALITY_ORDER.index(m)
        pattern = presence_codes(presence).tolist()
        pairs: dict[tuple[str | None, int, int], int] = {}
        inverse: list[int] = []
        first: list[int] = []
        for i, row in enumerate(rows.tolist()):
            key = split.keys[m][row] if bool(presence[i, column]) else None
            index = pairs.setdefault((key, pattern[i], contexts[i]), len(pairs))
            if index == len(first):
                first.append(i)
            inverse.append(index)
        raw: Sequence[Any] = [
            placeholder(m) if key is None else split.raw(m, key) for key, _, _ in pairs
        ]
        inputs = model.backbone.prepare(m, list(raw))
        inputs = {k: v.to(device) for k, v in inputs.items()}
        unique_context = None if context is None else context[first].to(device)
        unique = model.encode(m, inputs, presence[first].to(device), unique_context)
        out[m] = unique[torch.tensor(inverse, device=device)]
    return out
