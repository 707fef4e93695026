"""Tests of the frozen-encoder feature tables and their on-disk cache."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch

from mllm_missing.backbones.features import (
    FeatureTable,
    encode_column,
    load_feature_table,
    save_feature_table,
)
from mllm_missing.errors import DataFormatError


class CountingEncoder:
    """Encodes a string as [len, number of vowels], counting the inputs it sees."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.seen += texts
        return torch.tensor(
            [[len(t), sum(c in "aeiou" for c in t)] for t in texts], dtype=torch.float
        )


def _dataset(texts: list[str]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": texts, "key": [t.upper() for t in texts]})


def test_each_distinct_input_is_encoded_once_and_cached(tmp_path: Path) -> None:
    encoder = CountingEncoder()
    data = _dataset(["abc", "de", "abc", "fghi", "de"])
    cache = tmp_path / "f.st"
    table = encode_column(data, "text", encoder, cache_path=cache, batch_size=2)
    assert sorted(encoder.seen) == ["abc", "de", "fghi"]
    assert table.lookup(["de", "abc"]).tolist() == [[2, 1], [3, 1]]
    again = encode_column(data, "text", encoder, cache_path=cache)
    assert len(encoder.seen) == 3 and torch.equal(again.features, table.features)
    bigger = _dataset(["abc", "xyzzy"])
    encode_column(bigger, "text", encoder, cache_path=cache)
    assert encoder.seen[-1] == "xyzzy"


def test_key_column_groups_rows(tmp_path: Path) -> None:
    encoder = CountingEncoder()
    data = datasets.Dataset.from_dict({"text": ["aa", "bb", "cc"], "key": ["1", "1", "2"]})
    table = encode_column(data, "text", encoder, key_column="key")
    assert encoder.seen == ["aa", "cc"] and table.keys == ["1", "2"]


def test_table_checks_and_round_trip(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="NaN or inf"):
        FeatureTable(["a"], torch.tensor([[float("nan")]]))
    with pytest.raises(ValueError, match="1 keys but features of shape"):
        FeatureTable(["a"], torch.zeros(2, 3))
    table = FeatureTable(["a", "b"], torch.arange(6.0).reshape(2, 3))
    path = save_feature_table(table, tmp_path / "t.st")
    loaded = load_feature_table(path)
    assert loaded.keys == ["a", "b"] and torch.equal(loaded.features, table.features)
    with pytest.raises(KeyError, match="no embedding for input 'c'"):
        loaded.lookup(["c"])
    broken = tmp_path / "broken.st"
    broken.write_bytes(b"not safetensors")
    with pytest.raises(DataFormatError, match="broken.st"):
        load_feature_table(broken)
