"""The shape every evaluation task has: load a split, turn a row into a Sample, score."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mllm_missing.data.base import TaskInfo, require_labels
from mllm_missing.errors import ConfigError
from mllm_missing.metrics import compute_metrics
from mllm_missing.types import Presence, Sample

if TYPE_CHECKING:
    import datasets


class DatasetTask:
    """An evaluation task over one of the package's dataset loaders.

    Subclasses set `info` (the dataset's `TaskInfo`), `splits`, `eval_split` and `loader`.

    Args:
        root: folder of the dataset's official files (unused for packaged data).
        **options: passed to the loader (e.g. ``text_mode`` for MM-IMDb, ``cache_dir``).
    """

    info: TaskInfo
    splits: tuple[str, ...]
    eval_split: str
    loader: Callable[..., datasets.Dataset]

    def __init__(self, root: str | Path | None = None, **options: Any) -> None:
        self.root = root
        self.options = options

    def load(self, split: str | None = None) -> datasets.Dataset:
        """Load `split` (default: the task's evaluation split)."""
        split = split or self.eval_split
        if split not in self.splits:
            raise ConfigError(
                f"{self.info.name} split must be one of {', '.join(self.splits)}; got {split!r}"
            )
        return type(self).loader(self.root, split, **self.options)

    def to_inputs(self, example: dict[str, Any], presence: Presence) -> Sample:
        """The `Sample` of one dataset row with only the modalities `presence` keeps."""
        payloads = {m: example[m.value] for m in self.info.modalities if m in presence}
        return Sample(
            presence=presence, payloads=payloads, label=example.get("label"), id=str(example["id"])
        )

    def references(self, dataset: datasets.Dataset) -> np.ndarray:
        """The labels of `dataset`; refuses a split without labels."""
        require_labels(dataset, f"{self.info.name} split")
        return np.asarray(dataset["label"])

    def score(self, predictions: Sequence[Any] | np.ndarray, references: Any) -> dict[str, float]:
        """The task's metrics for model scores `predictions` against `references`."""
        return compute_metrics(self.info.task_type.value, references, np.asarray(predictions))
