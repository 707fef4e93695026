"""Tests of the imputation and fusion modules and the embedding classifier built from them."""

from __future__ import annotations

import pytest
import torch

from mllm_missing.data.base import TaskType
from mllm_missing.errors import ConfigError
from mllm_missing.heads import ClassificationHead, EmbeddingClassifier, task_loss
from mllm_missing.strategies.fusion import FUSIONS, FusionConfig, GatedFusion, build_fusion
from mllm_missing.strategies.imputation import IMPUTATIONS, ImputationConfig, build_imputation
from mllm_missing.types import Modality

DIMS = {Modality.IMAGE: 6, Modality.TEXT: 4}
PRESENCE = torch.tensor([[True, True, False], [False, True, False], [True, False, False]])


def _embeddings(seed: int = 0, rows: int = 3) -> dict[Modality, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {m: torch.randn(rows, d, generator=generator) for m, d in DIMS.items()}


def _imputation(method: str):  # type: ignore[no-untyped-def]
    module = build_imputation(ImputationConfig(method, hidden_size=8), DIMS)
    module.fit(_embeddings(1, 20), torch.ones(20, 3, dtype=torch.bool))
    return module


@pytest.mark.parametrize("method", IMPUTATIONS.names())
def test_present_rows_untouched_absent_rows_are_the_stand_in(method: str) -> None:
    module = _imputation(method)
    embeddings = _embeddings()
    out = module(embeddings, PRESENCE)
    assert torch.equal(out[Modality.IMAGE][[0, 2]], embeddings[Modality.IMAGE][[0, 2]])
    assert torch.equal(out[Modality.TEXT][[0, 1]], embeddings[Modality.TEXT][[0, 1]])
    # The stand-in may only depend on what is present: changing the hidden payload changes nothing.
    leaked = {m: x.clone() for m, x in embeddings.items()}
    leaked[Modality.IMAGE][1] += 100.0
    leaked[Modality.TEXT][2] -= 100.0
    again = module(leaked, PRESENCE)
    assert all(torch.equal(again[m], out[m]) for m in DIMS)


@pytest.mark.parametrize("method", ["zero", "learned_token"])
def test_fresh_zero_and_token_fill_with_zeros(method: str) -> None:
    out = _imputation(method)(_embeddings(), PRESENCE)
    assert torch.equal(out[Modality.IMAGE][1], torch.zeros(6))
    assert torch.equal(out[Modality.TEXT][2], torch.zeros(4))


def test_mean_fills_with_the_training_mean_of_present_rows() -> None:
    module = build_imputation(ImputationConfig("mean"), DIMS)
    with pytest.raises(RuntimeError, match="before fit"):
        module(_embeddings(), PRESENCE)
    train = _embeddings(5, 10)
    presence = torch.zeros(10, 3, dtype=torch.bool)
    presence[:4, 0] = True
    presence[:, 1] = True
    module.fit(train, presence)
    out = module(_embeddings(), PRESENCE)
    assert torch.allclose(out[Modality.IMAGE][1], train[Modality.IMAGE][:4].mean(0))
    assert torch.allclose(out[Modality.TEXT][2], train[Modality.TEXT].mean(0))
    restored = build_imputation(ImputationConfig("mean"), DIMS)
    restored.load_state_dict(module.state_dict())
    assert torch.equal(restored(_embeddings(), PRESENCE)[Modality.IMAGE], out[Modality.IMAGE])


def test_translator_learns_a_cross_modal_map() -> None:
    torch.manual_seed(0)
    mapping = torch.randn(4, 6)
    text = torch.randn(256, 4)
    data = {Modality.TEXT: text, Modality.IMAGE: text @ mapping}
    full = torch.ones(256, 3, dtype=torch.bool)
    module = build_imputation(ImputationConfig("translator", hidden_size=64), DIMS)
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    for _ in range(300):
        loss = module.auxiliary_loss(data, full)
        assert loss is not None
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    probe = torch.randn(8, 4)
    presence = torch.tensor([[False, True, False]] * 8)
    filled = module({Modality.TEXT: probe, Modality.IMAGE: torch.zeros(8, 6)}, presence)
    truth = probe @ mapping
    error = (filled[Modality.IMAGE] - truth).norm() / truth.norm()
    assert error < 0.25
    one_row = torch.tensor([[True, True, False]])
    assert module.auxiliary_loss(_embeddings(rows=1), one_row) is None


def test_only_learned_imputations_train() -> None:
    names = {n for n, _ in _imputation("learned_token").named_parameters()}
    assert names == {"tokens.image", "tokens.text"}
    assert _imputation("zero").trainable_parameters() == []
    assert _imputation("mean").trainable_parameters() == []
    assert _imputation("translator").trainable_parameters()


@pytest.mark.parametrize("method", FUSIONS.names())
def test_fusions_shape_and_gradients(method: str) -> None:
    fusion = build_fusion(FusionConfig(method=method, hidden_size=8, num_heads=2), DIMS)
    out = fusion(_embeddings(), PRESENCE)
    assert out.shape == (3, fusion.out_dim)
    out.sum().backward()
    assert all(p.grad is not None for p in fusion.parameters() if p.requires_grad)


@pytest.mark.parametrize("method", ["masked_attention", "late"])
def test_masking_fusions_never_read_absent_inputs(method: str) -> None:
    fusion = build_fusion(FusionConfig(method=method, hidden_size=8, num_heads=2), DIMS).eval()
    embeddings = _embeddings()
    changed = {m: x.clone() for m, x in embeddings.items()}
    changed[Modality.IMAGE][1] = 50.0  # row 1 has no image
    changed[Modality.TEXT][2] = -50.0  # row 2 has no text
    assert torch.allclose(fusion(embeddings, PRESENCE), fusion(changed, PRESENCE), atol=1e-6)
    changed[Modality.TEXT][0] = 7.0  # row 0 has text: this must matter
    assert not torch.allclose(fusion(embeddings, PRESENCE)[0], fusion(changed, PRESENCE)[0])


def test_late_fusion_is_the_mean_of_present_encodings() -> None:
    fusion = build_fusion(FusionConfig(method="late", hidden_size=8, dropout=0.0), DIMS)
    embeddings = _embeddings()
    out = fusion(embeddings, PRESENCE)
    image = fusion.projections["image"](embeddings[Modality.IMAGE])
    text = fusion.projections["text"](embeddings[Modality.TEXT])
    assert torch.allclose(out[0], (image[0] + text[0]) / 2)
    assert torch.allclose(out[1], text[1]) and torch.allclose(out[2], image[2])


def test_gates_depend_on_presence() -> None:
    fusion = build_fusion(FusionConfig(method="gated", hidden_size=8), DIMS)
    assert isinstance(fusion, GatedFusion)
    embeddings = _embeddings()
    gates = fusion.gate_values(embeddings, PRESENCE)
    assert gates.shape == (3, 2) and bool(((gates > 0) & (gates < 1)).all())
    flipped = fusion.gate_values(embeddings, torch.ones(3, 3, dtype=torch.bool))
    assert not torch.allclose(gates, flipped)


def test_wrong_shapes_and_unknown_names() -> None:
    module = build_imputation(ImputationConfig("zero"), DIMS)
    with pytest.raises(ValueError, match="image embeddings have shape"):
        module({Modality.IMAGE: torch.zeros(3, 5), Modality.TEXT: torch.zeros(3, 4)}, PRESENCE)
    with pytest.raises(ConfigError, match="imputation.method must be one of"):
        ImputationConfig("median")
    with pytest.raises(ConfigError, match="imputation.temperature"):
        ImputationConfig("translator", temperature=0)
    with pytest.raises(ConfigError, match="fusion.method"):
        FusionConfig(method="sum")
    with pytest.raises(ConfigError, match="fusion.dropout"):
        FusionConfig(dropout=1.0)
    with pytest.raises(ConfigError, match="fusion.num_heads"):
        FusionConfig(hidden_size=10, num_heads=3)
    with pytest.raises(ValueError, match="at least two modalities"):
        build_imputation(ImputationConfig("translator"), {Modality.TEXT: 4})


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


def test_knn_fills_with_the_neighbours_of_the_present_modality() -> None:
    # Two clusters: text direction tells which image cluster a sample belongs to.
    text = torch.tensor([[1.0, 0, 0, 0]] * 5 + [[0, 1.0, 0, 0]] * 5) + 0.01 * torch.randn(10, 4)
    image = torch.cat([torch.full((5, 6), 2.0), torch.full((5, 6), -3.0)])
    presence = torch.ones(10, 3, dtype=torch.bool)
    presence[[0, 9], 0] = False  # their images never enter the bank
    module = build_imputation(ImputationConfig("knn", k=3), DIMS)
    with pytest.raises(RuntimeError, match="before fit"):
        module(_embeddings(), PRESENCE)
    module.fit({Modality.TEXT: text, Modality.IMAGE: image * presence[:, :1]}, presence)
    assert module.bank is not None and len(module.bank) == 10
    query = {
        Modality.TEXT: torch.tensor([[0.0, 1.0, 0, 0], [1.0, 0, 0, 0]]),
        Modality.IMAGE: torch.zeros(2, 6),
    }
    filled = module(query, torch.tensor([[False, True, False], [False, True, False]]))
    assert torch.allclose(filled[Modality.IMAGE][0], torch.full((6,), -3.0))
    assert torch.allclose(filled[Modality.IMAGE][1], torch.full((6,), 2.0))
    with pytest.raises(ConfigError, match="imputation.k"):
        ImputationConfig("knn", k=0)


def test_knn_leaves_a_training_rows_own_group_out() -> None:
    """Rows 0 and 1 share an input (one group): row 0's nearest image is row 1's, unless row 0
    is a training row leaving its group out, as a test row never finds its own input."""
    text = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0.9, 0.1, 0, 0], [0.0, 1.0, 0, 0]])
    image = torch.stack([torch.zeros(6), torch.full((6,), 5.0), -torch.ones(6), torch.ones(6)])
    presence = torch.ones(4, 3, dtype=torch.bool)
    presence[0, 0] = False
    train = {Modality.TEXT: text, Modality.IMAGE: image}
    module = build_imputation(ImputationConfig("knn", k=1), DIMS)
    module.fit(train, presence, groups=["a", "a", "b", "c"])
    row = {m: x[:1] for m, x in train.items()}
    assert torch.equal(module(row, presence[:1])[Modality.IMAGE][0], torch.full((6,), 5.0))
    left_out = module(row, presence[:1], exclude_groups=["a"])[Modality.IMAGE][0]
    assert torch.equal(left_out, -torch.ones(6))
    # Present rows need no stand-in, so their groups change nothing.
    both = module(train, presence, exclude_groups=["a", "a", "b", "c"])
    assert torch.equal(both[Modality.IMAGE][1:], image[1:])
    with pytest.raises(ValueError, match="exclude_groups has 2 entries for 1 rows"):
        module(row, presence[:1], exclude_groups=["a", "b"])
    # Filling a whole split once, in chunks, hands each chunk its rows' groups.
    from mllm_missing.heads import impute_once

    once = impute_once(module, train, presence, chunk=1, exclude_groups=["a", "a", "b", "c"])
    assert once is not None and torch.equal(once[Modality.IMAGE], both[Modality.IMAGE])
    assert torch.equal(once[Modality.IMAGE][0], -torch.ones(6))
    # A bank kept without groups (as saved before groups existed) ignores them.
    ungrouped = build_imputation(ImputationConfig("knn", k=1), DIMS)
    ungrouped.fit(train, presence)
    again = ungrouped(row, presence[:1], exclude_groups=["1"])[Modality.IMAGE][0]
    assert torch.equal(again, torch.full((6,), 5.0))


def test_a_saved_knn_model_brings_its_memory_bank_back(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A knn checkpoint predicts as before after reloading (its bank is saved with it), and a
    folder without the bank is refused by name."""
    import shutil

    pytest.importorskip("open_clip")
    from mllm_missing.model import MissingModalityModel
    from mllm_missing.strategies.imputation.module import KNN_BANK_FOLDER
    from mllm_missing.strategies.testing import tiny_classifier, tiny_clip

    model = tiny_classifier(imputation="knn")
    train = {Modality.IMAGE: torch.randn(8, 32), Modality.TEXT: torch.randn(8, 32)}
    model.classifier.imputation.fit(train, torch.ones(8, 3, dtype=torch.bool))
    rows = torch.tensor([[False, True, False], [True, False, False], [True, True, False]])
    queries = {m: torch.randn(3, 32) * rows[:, i : i + 1] for i, m in enumerate(train)}
    with torch.no_grad():
        expected = model(queries, rows)
    model.save_pretrained(tmp_path / "saved")
    again = MissingModalityModel.from_pretrained(tmp_path / "saved", backbone=tiny_clip())
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(queries, rows), expected)
    shutil.rmtree(tmp_path / "saved" / KNN_BANK_FOLDER)
    with pytest.raises(FileNotFoundError, match="no memory bank"):
        MissingModalityModel.from_pretrained(tmp_path / "saved", backbone=tiny_clip())
