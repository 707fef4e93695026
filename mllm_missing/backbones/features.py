"""Frozen-encoder feature tables: encode each distinct input once and cache the result on disk.

A frozen encoder gives the same embedding every epoch, so training small parts on top of it only
needs the embeddings. Inputs are keyed (an image id, the question text...), each distinct key is
encoded once, and the table is written atomically as safetensors next to its keys.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from mllm_missing.atomic import atomic_write
from mllm_missing.errors import DataFormatError

if TYPE_CHECKING:
    import datasets

__all__ = ["FeatureTable", "encode_column", "load_feature_table", "save_feature_table"]

logger = logging.getLogger(__name__)


@dataclass
class FeatureTable:
    """Embeddings of distinct inputs.

    Attributes:
        keys: the distinct input keys, in row order.
        features: float tensor (len(keys), dim).
    """

    keys: list[str]
    features: torch.Tensor

    def __post_init__(self) -> None:
        if self.features.ndim != 2 or self.features.shape[0] != len(self.keys):
            raise ValueError(
                f"feature table has {len(self.keys)} keys but features of shape "
                f"{tuple(self.features.shape)}"
            )
        if not bool(torch.isfinite(self.features).all()):
            raise ValueError("feature table contains NaN or inf values")
        self._index = {key: i for i, key in enumerate(self.keys)}

    def rows(self, keys: Sequence[str]) -> torch.Tensor:
        """Row indices of `keys` (raises KeyError naming the first unknown key)."""
        try:
            return torch.tensor([self._index[k] for k in keys], dtype=torch.long)
        except KeyError as exc:
            raise KeyError(f"no embedding for input {exc.args[0]!r}") from None

    def lookup(self, keys: Sequence[str]) -> torch.Tensor:
        """Embeddings (len(keys), dim) of `keys`."""
        return self.features[self.rows(keys)]


def save_feature_table(table: FeatureTable, path: str | Path) -> Path:
    """Write `table` to `path` (safetensors, keys in the metadata), atomically."""
    from safetensors.torch import save_file

    tensors = {"features": table.features.contiguous()}
    metadata = {"keys": json.dumps(table.keys)}
    return atomic_write(path, lambda partial: save_file(tensors, str(partial), metadata=metadata))


def load_feature_table(path: str | Path) -> FeatureTable:
    """Read a table written by `save_feature_table`."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            features = handle.get_tensor("features")
    except Exception as exc:  # safetensors raises its own error type for a corrupt header
        raise DataFormatError(f"{path}: not a readable feature table ({exc})") from exc
    if "keys" not in metadata:
        raise DataFormatError(f"{path}: feature table has no keys")
    return FeatureTable(keys=json.loads(metadata["keys"]), features=features)


def encode_column(
    dataset: datasets.Dataset,
    column: str,
    encode: Callable[[list[Any]], torch.Tensor],
    *,
    key_column: str | None = None,
    cache_path: str | Path | None = None,
    batch_size: int = 64,
    desc: str | None = None,
) -> FeatureTable:
    """Encode every distinct value of `dataset[column]` once, with a progress bar.

    Args:
        dataset: the dataset holding the inputs.
        column: the input column (e.g. ``"image"``, decoded lazily row by row).
        encode: maps a list of inputs to a (len, dim) tensor.
        key_column: column identifying distinct inputs (default: the input column itself,
            which suits text).
        cache_path: a safetensors file to read the table from, or to write it to.
        batch_size: inputs per `encode` call.
        desc: progress-bar label.
    """
    key_values = [str(k) for k in dataset[key_column or column]]
    if cache_path is not None and Path(cache_path).is_file():
        table = load_feature_table(cache_path)
        missing = set(key_values) - set(table.keys)
        if not missing:
            return table
        logger.info("feature cache %s lacks %d inputs; re-encoding", cache_path, len(missing))
    first_row: dict[str, int] = {}
    for row, key in enumerate(key_values):
        first_row.setdefault(key, row)
    keys = list(first_row)
    chunks = []
    with tqdm(total=len(keys), desc=desc or f"encoding {column}", unit="input") as progress:
        for start in range(0, len(keys), batch_size):
            rows = [first_row[k] for k in keys[start : start + batch_size]]
            chunks.append(encode(dataset.select(rows)[column]).float().cpu())
            progress.update(len(rows))
    table = FeatureTable(keys=keys, features=torch.cat(chunks))
    if cache_path is not None:
        save_feature_table(table, cache_path)
    return table
