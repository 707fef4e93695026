"""Tests of the task heads, in particular the missing-aware pattern-routed head."""

from __future__ import annotations

import pytest
import torch

from mllm_missing.heads import ClassificationHead, PatternRoutedHead
from mllm_missing.types import Modality

IT = (Modality.IMAGE, Modality.TEXT)


def test_routed_head_uses_the_head_of_each_rows_pattern() -> None:
    torch.manual_seed(0)
    head = PatternRoutedHead(5, 3, IT, hidden_size=4, dropout=0.0).eval()
    assert sorted(head.heads) == ["1", "2", "3"]  # image only, text only, both
    features = torch.randn(4, 5)
    presence = torch.tensor(
        [[True, True, False], [True, False, False], [False, True, False], [True, True, True]]
    )
    out = head(features, presence)
    expected = [head.heads["3"], head.heads["1"], head.heads["2"], head.heads["3"]]
    for row, sub in enumerate(expected):
        assert torch.allclose(out[row], sub(features[row : row + 1])[0])


def test_routed_head_gradients_reach_only_the_used_heads() -> None:
    head = PatternRoutedHead(5, 2, IT, hidden_size=4)
    presence = torch.tensor([[False, True, False], [False, True, False]])
    head(torch.randn(2, 5), presence).sum().backward()
    used = [p.grad is not None for p in head.heads["2"].parameters()]
    unused = [p.grad is None for name in ("1", "3") for p in head.heads[name].parameters()]
    assert all(used) and all(unused)


def test_routed_head_errors() -> None:
    head = PatternRoutedHead(5, 2, IT)
    with pytest.raises(ValueError, match="needs the presence mask"):
        head(torch.randn(1, 5))
    with pytest.raises(ValueError, match="none of the head's modalities"):
        head(torch.randn(1, 5), torch.tensor([[False, False, True]]))


def test_shared_head_ignores_presence() -> None:
    head = ClassificationHead(5, 2, 4, 0.0).eval()
    x = torch.randn(3, 5)
    assert torch.equal(head(x), head(x, torch.ones(3, 3, dtype=torch.bool)))


def test_impute_once_matches_per_batch_imputation_and_skips_trained_ones() -> None:
    from mllm_missing.heads import impute_once
    from mllm_missing.strategies.imputation import ImputationConfig, build_imputation

    dims = {Modality.IMAGE: 3, Modality.TEXT: 2}
    torch.manual_seed(0)
    embeddings = {m: torch.randn(10, d) for m, d in dims.items()}
    presence = torch.ones(10, 3, dtype=torch.bool)
    presence[::3, 0] = False
    embeddings[Modality.IMAGE][::3] = 0
    mean = build_imputation(ImputationConfig("mean"), dims)
    mean.fit(embeddings, presence)
    once = impute_once(mean, embeddings, presence, chunk=4)
    assert once is not None
    whole = mean(embeddings, presence)
    assert all(torch.equal(once[m], whole[m]) for m in dims)
    assert (
        impute_once(build_imputation(ImputationConfig("learned_token"), dims), embeddings, presence)
        is None
    )
