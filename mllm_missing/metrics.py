"""Evaluation metrics in plain numpy (F1, AUROC, accuracy, bootstrap CIs), matching scikit-learn."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mllm_missing.errors import MllmMissingError

__all__ = [
    "TASK_TYPES",
    "UndefinedMetricError",
    "accuracy",
    "auroc",
    "binary_accuracy",
    "bootstrap_ci",
    "compute_metrics",
    "multiclass_accuracy",
    "multilabel_f1",
    "normalise_transcript",
    "word_errors",
]

logger = logging.getLogger(__name__)

#: The task types `compute_metrics` accepts.
TASK_TYPES: tuple[str, ...] = ("binary", "multiclass", "multilabel")


class UndefinedMetricError(MllmMissingError, ValueError):
    """A metric has no value on this data (e.g. AUROC when `y_true` holds a single class)."""


def _to_numpy(x: Any) -> np.ndarray:
    # Tensors are duck-typed so that importing this module never imports torch.
    if hasattr(x, "detach"):
        t = x.detach().cpu()
        try:
            return np.asarray(t)
        except TypeError:  # bfloat16 and friends have no numpy dtype
            return np.asarray(t.float())
    return np.asarray(x)


def _scores(x: Any, name: str = "scores") -> np.ndarray:
    arr = _to_numpy(x)
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); metrics need at least one sample")
    try:
        arr = arr.astype(np.float64, copy=False)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numeric; got dtype {arr.dtype}") from None
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains {int(np.isnan(arr).sum())} NaN value(s)")
    return arr


def _binary_labels(x: Any, name: str = "y_true") -> np.ndarray:
    arr = _to_numpy(x)
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); metrics need at least one sample")
    if arr.dtype == np.bool_:
        return arr
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must contain only 0 and 1; got dtype {arr.dtype}")
    is_01 = np.isin(arr, (0, 1))
    if not is_01.all():
        bad = np.unique(arr[~is_01])[:5]
        raise ValueError(f"{name} must contain only 0 and 1; found other values such as {bad}")
    return arr == 1


def _check_same_shape(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {names[0]} has shape {a.shape}, {names[1]} {b.shape}")


def _check_ndim(arr: np.ndarray, ndim: int, fn: str, name: str) -> None:
    if arr.ndim != ndim:
        want = "(n_samples,)" if ndim == 1 else "(n_samples, n_classes)"
        raise ValueError(f"{fn} expects {name} of shape {want}; got shape {arr.shape}")


def _cutoff(threshold: float, from_logits: bool) -> float:
    if from_logits:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1) with from_logits=True; got {threshold}")
        # Compare logits with logit(threshold): exact, unlike rounding through the sigmoid.
        return float(np.log(threshold) - np.log1p(-threshold))
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite; got {threshold}")
    return float(threshold)


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    # 2tp / (2tp + fp + fn), with 0 where the denominator is 0 (scikit-learn's zero_division=0).
    num = 2.0 * np.asarray(tp, dtype=np.float64)
    denom = num + fp + fn
    return np.divide(num, denom, out=np.zeros_like(num), where=denom > 0)


def multilabel_f1(
    y_true: Any, scores: Any, *, threshold: float = 0.5, from_logits: bool = False
) -> dict[str, float]:
    """F1 scores of a multi-label task (e.g. MM-IMDb genres), in every averaging mode.

    This is a multi-LABEL metric: each of the `c` columns is its own binary problem and a row may
    have any number of positive labels. Published MM-IMDb code has been known to compute F1 with a
    multi-class metric (argmax per row) instead; that is a different, wrong number. Each value
    equals scikit-learn's `f1_score(y_true, scores >= threshold, average=..., zero_division=0)`.

    Args:
        y_true: Multi-hot labels of shape (n_samples, n_classes), values 0/1 (or bool).
        scores: Probabilities (or logits, see `from_logits`) of the same shape.
        threshold: A label is predicted where `probability >= threshold`.
        from_logits: `scores` are logits; predict where `logits >= logit(threshold)`, which is
            the sigmoid of the logits thresholded without rounding error.

    Returns:
        `{"micro", "macro", "samples", "weighted"}` F1 scores. `macro` counts a class with no
        positives and no predictions as 0; `weighted` weighs classes by their number of positives
        (0 if there are none); `samples` averages per-row F1, a row with no true and no predicted
        labels counting as 0.

    Raises:
        ValueError: Shapes differ or are not 2-D, the input is empty, `scores` has NaN, or
            `y_true` has values other than 0/1.
    """
    y = _binary_labels(y_true)
    s = _scores(scores)
    _check_same_shape(y, s, ("y_true", "scores"))
    _check_ndim(y, 2, "multilabel_f1", "y_true and scores")
    pred = s >= _cutoff(threshold, from_logits)
    tp, fp, fn = y & pred, pred & ~y, y & ~pred
    tp_c, fp_c, fn_c = tp.sum(axis=0), fp.sum(axis=0), fn.sum(axis=0)
    per_class = _f1(tp_c, fp_c, fn_c)
    support = tp_c + fn_c
    total = support.sum()
    return {
        "micro": float(_f1(tp_c.sum(), fp_c.sum(), fn_c.sum())),
        "macro": float(per_class.mean()),
        "samples": float(_f1(tp.sum(axis=1), fp.sum(axis=1), fn.sum(axis=1)).mean()),
        "weighted": float((per_class * support).sum() / total) if total > 0 else 0.0,
    }


def auroc(y_true: Any, scores: Any) -> float:
    """Area under the ROC curve of a binary task, equal to scikit-learn's `roc_auc_score`.

    Computed as the Mann-Whitney U statistic with average ranks, so tied scores count one half,
    exactly as the trapezoidal ROC curve does.

    Args:
        y_true: Labels of shape (n_samples,), values 0/1 (or bool).
        scores: Scores of the same shape; higher means more likely positive. Any monotone
            transform (probabilities, logits) gives the same AUROC.

    Returns:
        The AUROC in [0, 1].

    Raises:
        UndefinedMetricError: `y_true` holds a single class (a `ValueError`).
        ValueError: Shapes differ or are not 1-D, the input is empty, `scores` has NaN, or
            `y_true` has values other than 0/1.
    """
    y = _binary_labels(y_true)
    s = _scores(scores)
    _check_same_shape(y, s, ("y_true", "scores"))
    _check_ndim(y, 1, "auroc", "y_true and scores")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        only = 1 if n_pos else 0
        raise UndefinedMetricError(
            f"AUROC is undefined when y_true has only one class (all {y.size} labels are {only})"
        )
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    avg_rank = (ends - counts + 1 + ends) / 2.0  # mean of the 1-based ranks of each tie group
    rank_sum = avg_rank[inverse.reshape(-1)][y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def accuracy(y_true: Any, y_pred: Any) -> float:
    """Fraction of predicted labels equal to the true labels.

    Takes labels, not scores: use `binary_accuracy` for probabilities or logits of a binary task
    and `multiclass_accuracy` for (n_samples, n_classes) scores.

    Args:
        y_true: Labels of shape (n_samples,).
        y_pred: Predicted labels of the same shape.

    Returns:
        The accuracy in [0, 1].

    Raises:
        ValueError: Shapes differ or are not 1-D, the input is empty, or `y_pred` holds
            non-integer floats (scores passed by mistake).
    """
    y, p = _to_numpy(y_true), _to_numpy(y_pred)
    _check_same_shape(y, p, ("y_true", "y_pred"))
    if y.size == 0:
        raise ValueError("y_true and y_pred are empty; metrics need at least one sample")
    _check_ndim(y, 1, "accuracy", "y_true and y_pred")
    for name, arr in (("y_true", y), ("y_pred", p)):
        if not np.issubdtype(arr.dtype, np.floating):
            continue
        if np.isnan(arr).any():
            raise ValueError(f"{name} contains {int(np.isnan(arr).sum())} NaN value(s)")
        if not np.array_equal(arr, np.round(arr)):
            raise ValueError(
                f"accuracy takes labels but {name} holds non-integer floats; use binary_accuracy "
                "for probabilities or multiclass_accuracy for (n_samples, n_classes) scores"
            )
    return float(np.mean(y == p))


def binary_accuracy(
    y_true: Any, scores: Any, *, threshold: float = 0.5, from_logits: bool = False
) -> float:
    """Accuracy of a binary task whose positive class is predicted where `scores >= threshold`.

    Args:
        y_true: Labels of shape (n_samples,), values 0/1 (or bool).
        scores: Positive-class probabilities (or logits, see `from_logits`) of the same shape.
        threshold: Probability at or above which the positive class is predicted.
        from_logits: `scores` are logits; predict where `logits >= logit(threshold)`.

    Returns:
        The accuracy in [0, 1].

    Raises:
        ValueError: Shapes differ or are not 1-D, the input is empty, `scores` has NaN, or
            `y_true` has values other than 0/1.
    """
    y = _binary_labels(y_true)
    s = _scores(scores)
    _check_same_shape(y, s, ("y_true", "scores"))
    _check_ndim(y, 1, "binary_accuracy", "y_true and scores")
    return float(np.mean((s >= _cutoff(threshold, from_logits)) == y))


def multiclass_accuracy(y_true: Any, scores: Any) -> float:
    """Accuracy of a multi-class task, predicting the argmax of each row of `scores`.

    Args:
        y_true: Integer class indices of shape (n_samples,), in [0, n_classes).
        scores: Logits or probabilities of shape (n_samples, n_classes).

    Returns:
        The accuracy in [0, 1].

    Raises:
        ValueError: `scores` is not 2-D, its row count differs from `y_true`, the input is empty,
            `scores` has NaN, or `y_true` holds values that are not class indices.
    """
    y = _to_numpy(y_true)
    s = _scores(scores)
    _check_ndim(s, 2, "multiclass_accuracy", "scores")
    if y.shape != s.shape[:1]:
        raise ValueError(
            f"shape mismatch: y_true has shape {y.shape}, scores {s.shape}; "
            "expected y_true (n_samples,) and scores (n_samples, n_classes)"
        )
    n_classes = s.shape[1]
    valid = np.issubdtype(y.dtype, np.integer) or (
        np.issubdtype(y.dtype, np.floating) and np.array_equal(y, np.round(y))
    )
    if not valid or y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"y_true must hold class indices in [0, {n_classes}); got {y[:5]}...")
    return float(np.mean(s.argmax(axis=1) == y))


def bootstrap_ci(
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    y_true: Any,
    scores: Any,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of `metric_fn(y_true, scores)` over samples.

    Rows (the first axis) are drawn with replacement by a `numpy.random.Generator` seeded with
    `seed`, so the same inputs and seed give the same interval. The metric is first evaluated on
    the full data, so input errors surface instead of being skipped. A resample on which the
    metric is undefined (it raises `ValueError`, e.g. AUROC on a resample with a single class, or
    returns NaN) is skipped; the interval uses the remaining resamples, and the number skipped is
    logged.

    Args:
        metric_fn: Called as `metric_fn(y_true_resample, scores_resample)` with numpy arrays;
            returns a float (e.g. `auroc`, or `lambda y, s: multilabel_f1(y, s)["macro"]`).
        y_true: Labels; the first axis indexes samples.
        scores: Scores with as many rows as `y_true`.
        n_resamples: Number of bootstrap resamples.
        confidence: Coverage of the interval, in (0, 1).
        seed: Seed of the random generator.

    Returns:
        `(lower, upper)` with `lower <= upper`.

    Raises:
        ValueError: Bad `n_resamples` or `confidence`, row counts differ, the input is empty, the
            metric fails on the full data, or it is undefined on every resample.
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1; got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")
    y, s = _to_numpy(y_true), _to_numpy(scores)
    if y.ndim == 0 or s.ndim == 0 or y.shape[0] != s.shape[0]:
        raise ValueError(
            f"shape mismatch: y_true has shape {y.shape}, scores {s.shape}; "
            "they need the same number of rows"
        )
    n = y.shape[0]
    if n == 0:
        raise ValueError("y_true and scores are empty; metrics need at least one sample")
    metric_fn(y, s)
    rng = np.random.default_rng(seed)
    values: list[float] = []
    for _ in range(n_resamples):
        idx = rng.integers(0, n, size=n)
        try:
            value = float(metric_fn(y[idx], s[idx]))
        except ValueError:
            continue
        if not np.isnan(value):
            values.append(value)
    skipped = n_resamples - len(values)
    if not values:
        raise UndefinedMetricError(f"the metric is undefined on all {n_resamples} resamples")
    if skipped:
        logger.info("bootstrap_ci: skipped %d of %d undefined resamples", skipped, n_resamples)
    alpha = 1.0 - confidence
    lower, upper = np.quantile(np.asarray(values), [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lower), float(upper)


def compute_metrics(
    task_type: str, y_true: Any, scores: Any, *, threshold: float = 0.5, from_logits: bool = False
) -> dict[str, float]:
    """The standard metrics of a task type, as a flat dict ready for `results.json`.

    - `"multilabel"`: `f1_micro`, `f1_macro`, `f1_samples`, `f1_weighted` from `multilabel_f1`
      on (n_samples, n_classes) multi-hot labels and scores.
    - `"binary"`: `auroc` and `accuracy` on 0/1 labels. `scores` is either (n_samples,)
      positive-class probabilities (or logits with `from_logits=True`), thresholded for accuracy,
      or (n_samples, 2) two-class scores: accuracy from the argmax, AUROC from the difference of
      the columns (the log-odds for logits, monotone in p1 for softmax probabilities).
    - `"multiclass"`: `accuracy`, from the argmax of (n_samples, n_classes) scores, or of
      (n_samples,) predicted labels.

    Args:
        task_type: One of `TASK_TYPES`.
        y_true: Labels, as the task type expects.
        scores: Scores or predictions, as the task type expects.
        threshold: Probability threshold for multilabel and 1-D binary scores.
        from_logits: Multilabel and 1-D binary scores are logits.

    Returns:
        Metric name to value.

    Raises:
        ValueError: Unknown `task_type` (the message lists the allowed ones) or invalid input.
    """
    if task_type == "multilabel":
        f1 = multilabel_f1(y_true, scores, threshold=threshold, from_logits=from_logits)
        return {f"f1_{k}": v for k, v in f1.items()}
    if task_type == "binary":
        s = _scores(scores)
        if s.ndim == 2 and s.shape[1] == 2:
            y = _binary_labels(y_true).astype(np.int64)
            return {"auroc": auroc(y, s[:, 1] - s[:, 0]), "accuracy": multiclass_accuracy(y, s)}
        return {
            "auroc": auroc(y_true, s),
            "accuracy": binary_accuracy(y_true, s, threshold=threshold, from_logits=from_logits),
        }
    if task_type == "multiclass":
        if _to_numpy(scores).ndim == 2:
            return {"accuracy": multiclass_accuracy(y_true, scores)}
        return {"accuracy": accuracy(y_true, scores)}
    raise ValueError(f"unknown task_type {task_type!r}; allowed: {', '.join(TASK_TYPES)}")


def normalise_transcript(text: str) -> list[str]:
    """Lower-case words without punctuation, for word error rates; hyphens split words and
    "mr" reads "mister" (how the pocketsphinx reference transcripts spell it)."""
    import re

    words = re.sub(r"[^a-z0-9' ]", " ", text.lower().replace("-", " ")).split()
    return ["mister" if word == "mr" else word for word in words]


def word_errors(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Word-level edit distance (substitutions + insertions + deletions); WER is this divided
    by ``len(reference)``."""
    row = list(range(len(hypothesis) + 1))
    for i, ref_word in enumerate(reference, 1):
        previous, row[0] = row[0], i
        for j, hyp_word in enumerate(hypothesis, 1):
            previous, row[j] = (
                row[j],
                min(row[j] + 1, row[j - 1] + 1, previous + (ref_word != hyp_word)),
            )
    return row[-1]
