"""Metrics checked against scikit-learn on random data and hand-built edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from mllm_missing.metrics import (
    TASK_TYPES,
    UndefinedMetricError,
    accuracy,
    auroc,
    binary_accuracy,
    bootstrap_ci,
    compute_metrics,
    multiclass_accuracy,
    multilabel_f1,
)

AVERAGES = ("micro", "macro", "samples", "weighted")
SHAPES = [(1, 1), (2, 3), (7, 1), (10, 5), (50, 23), (200, 4)]


def _sk_f1(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    if y.shape[1] > 1:
        return {a: f1_score(y, pred, average=a, zero_division=0) for a in AVERAGES}
    # scikit-learn reads one column as a binary task. An extra all-negative, never-predicted
    # column leaves micro, samples and weighted F1 unchanged and halves macro.
    pad = np.zeros_like(y)
    ref = _sk_f1(np.hstack([y, pad]), np.hstack([pred, pad]).astype(bool))
    return {**ref, "macro": 2 * ref["macro"]}


def _random_multilabel(seed: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    density = rng.uniform(0.05, 0.6)
    y = (rng.random(shape) < density).astype(np.int64)
    # Scores correlated with the labels so every regime (tp, fp, fn) occurs.
    scores = np.clip(0.35 * y + rng.random(shape) * 0.75, 0.0, 1.0)
    return y, scores


def _assert_f1_matches(ours: dict[str, float], ref: dict[str, float]) -> None:
    assert set(ours) == set(AVERAGES)
    for a in AVERAGES:
        assert ours[a] == pytest.approx(ref[a], abs=1e-12), a


# ---------------------------------------------------------------- multilabel F1


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", range(8))
def test_multilabel_f1_matches_sklearn(seed: int, shape: tuple[int, int]) -> None:
    y, scores = _random_multilabel(seed, shape)
    _assert_f1_matches(multilabel_f1(y, scores), _sk_f1(y, scores >= 0.5))


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("seed", range(4))
def test_multilabel_f1_threshold_and_logits_match_sklearn(seed: int, threshold: float) -> None:
    rng = np.random.default_rng(100 + seed)
    y = (rng.random((40, 6)) < 0.3).astype(np.int64)
    logits = rng.normal(size=(40, 6)) + 1.5 * y
    probs = 1.0 / (1.0 + np.exp(-logits))
    ref = _sk_f1(y, probs >= threshold)
    _assert_f1_matches(multilabel_f1(y, probs, threshold=threshold), ref)
    _assert_f1_matches(multilabel_f1(y, logits, threshold=threshold, from_logits=True), ref)


def test_multilabel_f1_from_logits_thresholds_at_zero() -> None:
    y = np.array([[1, 0]])
    logits = np.array([[0.0, -1e-3]])
    assert multilabel_f1(y, logits, from_logits=True)["micro"] == 1.0
    # Read as probabilities the same numbers predict nothing.
    assert multilabel_f1(y, logits)["micro"] == 0.0


def test_multilabel_f1_edge_cases_match_sklearn() -> None:
    y = np.array(
        [
            [1, 0, 0, 1],
            [1, 0, 0, 0],
            [0, 0, 0, 0],  # a row with no labels and no predictions
            [0, 0, 1, 0],  # a row with labels but no predictions
            [0, 0, 0, 0],  # a row with predictions but no labels
        ]
    )
    scores = np.array(
        [
            [0.9, 0.1, 0.8, 0.2],  # class 2 predicted although negative
            [0.7, 0.0, 0.1, 0.0],
            [0.1, 0.2, 0.3, 0.4],
            [0.1, 0.2, 0.3, 0.4],
            [0.6, 0.2, 0.3, 0.9],
        ]
    )
    # Class 1 has no positives and is never predicted; class 3 is positive once, never hit.
    ours = multilabel_f1(y, scores)
    _assert_f1_matches(ours, _sk_f1(y, scores >= 0.5))
    # Hand check so the expectation does not rest on scikit-learn alone.
    per_class = np.array([2 * 2 / (2 * 2 + 1 + 0), 0.0, 0.0, 0.0])
    assert ours["macro"] == pytest.approx(per_class.mean())
    assert ours["micro"] == pytest.approx(2 * 2 / (2 * 2 + 3 + 2))
    assert ours["weighted"] == pytest.approx(per_class[0] * 2 / 4)
    assert ours["samples"] == pytest.approx((2 / 4 + 1 + 0 + 0 + 0) / 5)


def test_multilabel_f1_no_positives_anywhere() -> None:
    y = np.zeros((4, 3), dtype=int)
    scores = np.full((4, 3), 0.1)
    scores[0, 0] = 0.9
    _assert_f1_matches(multilabel_f1(y, scores), _sk_f1(y, scores >= 0.5))
    assert multilabel_f1(y, np.zeros((4, 3))) == dict.fromkeys(AVERAGES, 0.0)


def test_multilabel_f1_is_not_multiclass_f1_and_macro_is_not_micro() -> None:
    # One frequent well-predicted class and one rare missed class: macro << micro.
    y = np.zeros((10, 2), dtype=int)
    y[:, 0] = 1
    y[0, 1] = 1
    scores = np.zeros((10, 2))
    scores[:, 0] = 0.9
    ours = multilabel_f1(y, scores)
    assert ours["micro"] == pytest.approx(20 / 21)
    assert ours["macro"] == pytest.approx(0.5)
    assert ours["weighted"] == pytest.approx(10 / 11)
    # The multi-class reading (argmax per row) gives a different number: 1.0 everywhere.
    multiclass = f1_score(y.argmax(1), scores.argmax(1), average="macro", zero_division=0)
    assert multiclass == 1.0
    assert ours["macro"] != multiclass


def test_multilabel_f1_accepts_torch_lists_and_bool() -> None:
    y, scores = _random_multilabel(3, (12, 4))
    ref = multilabel_f1(y, scores)
    assert multilabel_f1(torch.from_numpy(y), torch.from_numpy(scores).float()) == pytest.approx(
        ref
    )
    assert multilabel_f1(y.astype(bool).tolist(), scores.tolist()) == ref
    grad = torch.tensor(scores, requires_grad=True)
    assert multilabel_f1(torch.tensor(y), grad) == ref
    assert multilabel_f1(y, torch.tensor(scores, dtype=torch.bfloat16))["micro"] >= 0.0


def test_multilabel_f1_errors() -> None:
    y, scores = _random_multilabel(0, (5, 3))
    with pytest.raises(ValueError, match=r"\(5, 3\).*\(5, 4\)"):
        multilabel_f1(y, np.zeros((5, 4)))
    bad = scores.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        multilabel_f1(y, bad)
    with pytest.raises(ValueError, match="empty"):
        multilabel_f1(np.zeros((0, 3)), np.zeros((0, 3)))
    with pytest.raises(ValueError, match="only 0 and 1"):
        multilabel_f1(y * 2, scores)
    with pytest.raises(ValueError, match="n_classes"):
        multilabel_f1(y[:, 0], scores[:, 0])
    with pytest.raises(ValueError, match="threshold"):
        multilabel_f1(y, scores, threshold=1.0, from_logits=True)


# ---------------------------------------------------------------- AUROC


@pytest.mark.parametrize("n", [2, 5, 31, 400])
@pytest.mark.parametrize("seed", range(8))
def test_auroc_matches_sklearn(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < rng.uniform(0.1, 0.9)).astype(int)
    y[0], y[-1] = 0, 1  # both classes present
    scores = rng.normal(size=n) + y
    assert auroc(y, scores) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)


@pytest.mark.parametrize("levels", [1, 2, 3, 10])
@pytest.mark.parametrize("seed", range(6))
def test_auroc_ties_match_sklearn(seed: int, levels: int) -> None:
    rng = np.random.default_rng(50 + seed)
    y = rng.integers(0, 2, size=60)
    y[:2] = [0, 1]
    scores = rng.integers(0, levels, size=60) / max(levels, 1)
    assert auroc(y, scores) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)


def test_auroc_known_values() -> None:
    assert auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert auroc([0, 1], [0.5, 0.5]) == 0.5
    assert auroc([1, 0], [0.9, 0.1]) == 1.0
    assert auroc([0, 1], [0.9, 0.1]) == 0.0
    assert auroc(torch.tensor([0, 1, 1]), torch.tensor([0.2, 0.1, 0.7])) == pytest.approx(0.5)


def test_auroc_errors() -> None:
    with pytest.raises(UndefinedMetricError, match="only one class"):
        auroc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="only one class"):
        auroc([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="only 0 and 1"):
        auroc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="only 0 and 1"):
        auroc([-1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"\(3,\).*\(2,\)"):
        auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        auroc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="empty"):
        auroc([], [])


# ---------------------------------------------------------------- accuracy


@pytest.mark.parametrize("seed", range(5))
def test_accuracies_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, size=80)
    logits = rng.normal(size=(80, 4))
    logits[np.arange(80), y] += 1.0
    assert multiclass_accuracy(y, logits) == pytest.approx(accuracy_score(y, logits.argmax(1)))
    assert accuracy(y, logits.argmax(1)) == pytest.approx(accuracy_score(y, logits.argmax(1)))
    yb = rng.integers(0, 2, size=80)
    probs = np.clip(rng.random(80) + 0.3 * yb, 0, 1)
    ref = accuracy_score(yb, probs >= 0.5)
    assert binary_accuracy(yb, probs) == pytest.approx(ref)
    assert binary_accuracy(yb, np.log(probs / (1 - probs + 1e-12) + 1e-12), from_logits=True) == (
        pytest.approx(ref)
    )
    assert binary_accuracy(yb, probs, threshold=0.7) == pytest.approx(
        accuracy_score(yb, probs >= 0.7)
    )


def test_accuracy_errors() -> None:
    with pytest.raises(ValueError, match="binary_accuracy"):
        accuracy([0, 1], [0.2, 0.7])
    with pytest.raises(ValueError, match=r"\(2,\).*\(2, 2\)"):
        accuracy([0, 1], [[0.2, 0.7], [0.1, 0.3]])
    with pytest.raises(ValueError, match="NaN"):
        accuracy([0.0, 1.0], [0.0, float("nan")])
    with pytest.raises(ValueError, match="class indices"):
        multiclass_accuracy([0, 3], np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"\(3,\).*\(2, 3\)"):
        multiclass_accuracy([0, 1, 2], np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN"):
        multiclass_accuracy([0, 1], np.array([[0.0, np.nan], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="only 0 and 1"):
        binary_accuracy([0, 2], [0.1, 0.9])


# ---------------------------------------------------------------- bootstrap


def _binary_data(seed: int = 0, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    return y, rng.normal(size=n) + 1.2 * y


def test_bootstrap_is_deterministic_and_contains_point_estimate() -> None:
    y, scores = _binary_data()
    first = bootstrap_ci(auroc, y, scores, n_resamples=200, seed=7)
    assert bootstrap_ci(auroc, y, scores, n_resamples=200, seed=7) == first
    assert bootstrap_ci(auroc, y, scores, n_resamples=200, seed=8) != first
    lower, upper = first
    assert lower <= auroc(y, scores) <= upper
    assert 0.0 < upper - lower < 0.2
    narrow = bootstrap_ci(auroc, y, scores, n_resamples=200, seed=7, confidence=0.5)
    assert lower <= narrow[0] <= narrow[1] <= upper


def test_bootstrap_multilabel_metric() -> None:
    y, scores = _random_multilabel(1, (120, 5))
    macro = multilabel_f1(y, scores)["macro"]
    lower, upper = bootstrap_ci(
        lambda a, b: multilabel_f1(a, b)["macro"], y, scores, n_resamples=100
    )
    assert lower <= macro <= upper


def test_bootstrap_skips_undefined_resamples(caplog: pytest.LogCaptureFixture) -> None:
    # One positive in 20: about a third of resamples have a single class.
    y = np.zeros(20, dtype=int)
    y[0] = 1
    scores = np.linspace(0, 1, 20)[::-1].copy()
    with caplog.at_level("INFO", logger="mllm_missing.metrics"):
        lower, upper = bootstrap_ci(auroc, y, scores, n_resamples=100)
    assert lower == upper == 1.0
    assert "skipped" in caplog.text


def test_bootstrap_errors() -> None:
    y, scores = _binary_data(n=10)
    with pytest.raises(ValueError, match=r"\(10,\).*\(9,\)"):
        bootstrap_ci(auroc, y, scores[:9])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci(auroc, y, scores, confidence=1.0)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_ci(auroc, y, scores, n_resamples=0)
    with pytest.raises(ValueError, match="only one class"):
        bootstrap_ci(auroc, np.ones(10), scores)
    with pytest.raises(UndefinedMetricError, match="all 5 resamples"):
        bootstrap_ci(lambda a, b: float("nan"), y, scores, n_resamples=5)


# ---------------------------------------------------------------- compute_metrics


def test_compute_metrics_dispatch() -> None:
    y, scores = _random_multilabel(2, (30, 4))
    ml = compute_metrics("multilabel", y, scores)
    assert ml == {f"f1_{k}": v for k, v in multilabel_f1(y, scores).items()}

    yb, sb = _binary_data(n=50)
    probs = 1.0 / (1.0 + np.exp(-sb))
    assert compute_metrics("binary", yb, probs) == {
        "auroc": pytest.approx(roc_auc_score(yb, probs)),
        "accuracy": pytest.approx(accuracy_score(yb, probs >= 0.5)),
    }
    assert compute_metrics("binary", yb, sb, from_logits=True) == compute_metrics(
        "binary", yb, probs
    )
    two = np.stack([np.zeros_like(sb), sb], axis=1)
    assert compute_metrics("binary", yb, two) == pytest.approx(
        {"auroc": roc_auc_score(yb, sb), "accuracy": accuracy_score(yb, two.argmax(1))}
    )

    yc = np.array([0, 2, 1, 2])
    logits = np.eye(3)[[0, 2, 2, 1]]
    assert compute_metrics("multiclass", yc, logits) == {"accuracy": 0.5}
    assert compute_metrics("multiclass", yc, logits.argmax(1)) == {"accuracy": 0.5}


def test_compute_metrics_unknown_task_lists_allowed() -> None:
    with pytest.raises(ValueError, match="regression") as info:
        compute_metrics("regression", [0, 1], [0.1, 0.9])
    for name in TASK_TYPES:
        assert name in str(info.value)


def test_word_errors_and_transcript_normalisation() -> None:
    from mllm_missing.metrics import normalise_transcript, word_errors

    assert normalise_transcript("Mr. Quilter's ill-disposed, TEN!") == [
        "mister", "quilter's", "ill", "disposed", "ten",
    ]  # fmt: skip
    assert word_errors(["a", "b", "c"], ["a", "x", "c", "d"]) == 2
    assert word_errors([], ["a"]) == 1 and word_errors(["a"], []) == 1
