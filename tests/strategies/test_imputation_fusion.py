"""Tests of the imputation and fusion modules and the embedding classifier built from them."""

from __future__ import annotations

import pytest
import torch

from mllm_missing.data.base import TaskType
from mllm_missing.errors import ConfigError
from mllm_missing.heads import ClassificationHead, EmbeddingClassifier, task_loss
from mllm_missing.strategies.fusion import FusionConfig, build_fusion
from mllm_missing.strategies.imputation import IMPUTATIONS, ImputationConfig, build_imputation
from mllm_missing.types import Modality

DIMS = {Modality.IMAGE: 6, Modality.TEXT: 4}
PRESENCE = torch.tensor([[True, True, False], [False, True, False], [True, False, False]])


def _embeddings() -> dict[Modality, torch.Tensor]:
    torch.manual_seed(0)
    return {m: torch.randn(3, d) for m, d in DIMS.items()}


@pytest.mark.parametrize("method", IMPUTATIONS.names())
def test_present_rows_untouched_absent_rows_filled(method: str) -> None:
    module = build_imputation(ImputationConfig(method), DIMS)
    embeddings = _embeddings()
    out = module(embeddings, PRESENCE)
    assert torch.equal(out[Modality.IMAGE][[0, 2]], embeddings[Modality.IMAGE][[0, 2]])
    assert torch.equal(out[Modality.TEXT][[0, 1]], embeddings[Modality.TEXT][[0, 1]])
    # A freshly built module fills with zeros (learned tokens start at zero).
    assert torch.equal(out[Modality.IMAGE][1], torch.zeros(6))
    assert torch.equal(out[Modality.TEXT][2], torch.zeros(4))


def test_learned_token_trains_only_its_tokens_and_fills_with_them() -> None:
    module = build_imputation(ImputationConfig("learned_token"), DIMS)
    names = {n for n, _ in module.named_parameters()}
    assert names == {"tokens.image", "tokens.text"}
    out = module(_embeddings(), PRESENCE)
    out[Modality.IMAGE].sum().backward()
    grad = module.tokens["image"].grad
    assert grad is not None and torch.equal(grad, torch.ones(6))  # one absent image row
    with torch.no_grad():
        module.tokens["text"].fill_(2.0)
    assert torch.equal(module(_embeddings(), PRESENCE)[Modality.TEXT][2], torch.full((4,), 2.0))
    assert build_imputation(ImputationConfig("zero"), DIMS).trainable_parameters() == []


def test_wrong_shapes_and_unknown_names() -> None:
    module = build_imputation(ImputationConfig("zero"), DIMS)
    with pytest.raises(ValueError, match="image embeddings have shape"):
        module({Modality.IMAGE: torch.zeros(3, 5), Modality.TEXT: torch.zeros(3, 4)}, PRESENCE)
    with pytest.raises(ConfigError, match="imputation.method must be one of"):
        ImputationConfig("median")
    with pytest.raises(ConfigError, match="fusion.method"):
        FusionConfig(method="sum")
    with pytest.raises(ConfigError, match="fusion.dropout"):
        FusionConfig(dropout=1.0)


def test_classifier_end_to_end_learns_and_refuses_all_missing() -> None:
    torch.manual_seed(0)
    imputation = build_imputation(ImputationConfig("learned_token"), DIMS)
    fusion = build_fusion(FusionConfig(hidden_size=8, dropout=0.0), DIMS)
    model = EmbeddingClassifier(imputation, fusion, ClassificationHead(fusion.out_dim, 3, 16, 0.0))
    embeddings, labels = _embeddings(), torch.tensor([0, 1, 2])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    first = None
    for _ in range(60):
        loss = task_loss(TaskType.MULTICLASS, model(embeddings, PRESENCE), labels)
        first = first if first is not None else float(loss.detach())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 0.1 * first
    with pytest.raises(ValueError, match="every modality missing"):
        model(embeddings, torch.zeros(3, 3, dtype=torch.bool))


def test_task_losses_match_torch() -> None:
    logits = torch.tensor([[0.5, -1.0], [2.0, 0.1]])
    multi = torch.tensor([[1, 0], [1, 1]])
    assert torch.isclose(
        task_loss(TaskType.MULTILABEL, logits, multi),
        torch.nn.functional.binary_cross_entropy_with_logits(logits, multi.float()),
    )
    binary = task_loss(TaskType.BINARY, logits[:, :1], torch.tensor([1, 0]))
    assert torch.isclose(
        binary,
        torch.nn.functional.binary_cross_entropy_with_logits(
            logits[:, 0], torch.tensor([1.0, 0.0])
        ),
    )
