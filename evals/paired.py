"""Paired comparison of two checkpoints that `mllm-missing eval` scored on the same samples.

Two methods' marginal intervals overlapping does not say their difference is noise, and disjoint
ones are a needlessly strict test: both were scored on the same questions with the same masks, so
the question is the interval of the *difference*. Each resample of the paired bootstrap draws the
same samples for both methods, so per-sample luck cancels.

Several eval folders (e.g. one per training seed, each scoring that seed's two checkpoints) are
pooled: the difference is the mean over folders of ``metric(b) - metric(a)``, and each resample
draws every folder's samples anew (a stratified bootstrap over samples; the seeds themselves are
not resampled, so the interval is about these runs, not about a new seed)::

    python -m evals.paired runs/eval/seed0 runs/eval/seed1 runs/eval/seed2 --a zero --b knn
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mllm_missing.errors import ConfigError, DataFormatError
from mllm_missing.types import Presence

__all__ = ["PairedResult", "compare_folders", "main", "paired_difference", "setting_key"]

Metric = Callable[[torch.Tensor, torch.Tensor], float]


@dataclass(frozen=True)
class PairedResult:
    """``metric(b) - metric(a)`` pooled over runs, with its paired-bootstrap interval.

    Attributes:
        a: mean over runs of method a's metric.
        b: mean over runs of method b's metric.
        difference: ``b - a``.
        ci95: 95 % percentile interval of the difference.
        per_run: each run's ``b - a``.
        samples: samples per run.
    """

    a: float
    b: float
    difference: float
    ci95: tuple[float, float]
    per_run: tuple[float, ...]
    samples: tuple[int, ...]


def paired_difference(
    runs: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    metric: Metric,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
) -> PairedResult:
    """Pooled ``metric(b) - metric(a)`` over runs of ``(labels, logits_a, logits_b)``.

    Raises:
        ValueError: no runs, or a run whose three tensors disagree in length.
    """
    if not runs:
        raise ValueError("paired_difference needs at least one run")
    for index, (labels, first, second) in enumerate(runs):
        if not len(labels) == len(first) == len(second) > 0:
            raise ValueError(
                f"run {index}: {len(labels)} labels, {len(first)} and {len(second)} predictions; "
                "a paired comparison needs the same non-empty samples"
            )
    a = [metric(y, first) for y, first, _ in runs]
    b = [metric(y, second) for y, _, second in runs]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_resamples):
        total = 0.0
        for labels, first, second in runs:
            rows = torch.from_numpy(rng.integers(0, len(labels), size=len(labels)))
            total += metric(labels[rows], second[rows]) - metric(labels[rows], first[rows])
        draws.append(total / len(runs))
    low, high = np.quantile(np.asarray(draws), [0.025, 0.975])
    return PairedResult(
        a=float(np.mean(a)),
        b=float(np.mean(b)),
        difference=float(np.mean(b) - np.mean(a)),
        ci95=(float(low), float(high)),
        per_run=tuple(float(y - x) for x, y in zip(a, b)),
        samples=tuple(len(run[0]) for run in runs),
    )


def setting_key(slug: str) -> str:
    """A setting's slug without its mask seed (``both-0.70-b0.50-s1`` -> ``both-0.70-b0.50``),
    so folders scored with different seeds pair up by setting."""
    return re.sub(r"-s\d+$", "", slug)


def _kept(folder: Path, method: str) -> dict[str, Path]:
    """Setting key -> the file of `method`'s kept predictions in `folder`."""
    return {setting_key(p.stem): p for p in (folder / "logits" / method).glob("*.pt")}


def _predictions(folder: Path, method: str, setting: str) -> dict[str, torch.Tensor]:
    path = _kept(folder, method).get(setting_key(setting))
    if path is None:
        known = sorted(p.name for p in (folder / "logits").glob("*")) or ["none"]
        raise DataFormatError(
            f"{folder}: no predictions of {method} in {setting} (methods with kept predictions: "
            f"{', '.join(known)})"
        )
    loaded: dict[str, torch.Tensor] = torch.load(path)
    return loaded


def _task_metric(folders: Sequence[Path]) -> tuple[str, Metric]:
    """The task every folder scored and its headline metric."""
    from evals.tasks import TASKS
    from mllm_missing.training.supervised import score

    tasks = set()
    for folder in folders:
        path = folder / "eval_config.json"
        if not path.is_file():
            raise DataFormatError(f"{path}: not found; is {folder} an `mllm-missing eval` output?")
        tasks.add(json.loads(path.read_text(encoding="utf-8"))["task"])
    if len(tasks) != 1:
        raise ConfigError(f"the folders scored different tasks ({', '.join(sorted(tasks))})")
    info = TASKS.get(tasks.pop()).info

    def metric(labels: torch.Tensor, logits: torch.Tensor) -> float:
        return float(score(info, labels, logits)[info.metric])

    return str(info.metric), metric


def common_settings(folders: Sequence[Path], a: str, b: str) -> list[str]:
    """The settings (`setting_key`) with kept predictions of both methods in every folder."""
    keys: set[str] | None = None
    for folder in folders:
        for method in (a, b):
            found = set(_kept(folder, method))
            keys = found if keys is None else keys & found
    return sorted(keys or ())


def compare_folders(
    folders: Sequence[str | Path],
    a: str,
    b: str,
    setting: str,
    *,
    pattern: str | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> tuple[str, PairedResult]:
    """The headline metric's name and the paired difference of methods `a` and `b` in
    `setting` (a slug such as ``both-0.70-b0.50``, with or without its ``-s<seed>``) over
    eval output `folders`; with `pattern` (e.g. ``text``: the image is missing), only the
    samples of that presence pattern.

    Raises:
        DataFormatError: a folder lacks a method's predictions, or the two methods were scored
            on different samples or masks there.
    """
    paths = [Path(f) for f in folders]
    name, metric = _task_metric(paths)
    runs = []
    for folder in paths:
        first, second = _predictions(folder, a, setting), _predictions(folder, b, setting)
        for key in ("labels", "presence"):
            if not torch.equal(first[key], second[key]):
                raise DataFormatError(
                    f"{folder}: {a} and {b} were scored on different {key} in {setting}; "
                    "a paired comparison needs the same samples and masks"
                )
        rows = torch.arange(len(first["labels"]))
        if pattern is not None:
            patterns = [Presence.from_flags(r).pattern for r in first["presence"].tolist()]
            rows = torch.tensor(
                [i for i, p in enumerate(patterns) if p == pattern], dtype=torch.long
            )
            if not len(rows):
                raise DataFormatError(f"{folder}: no sample of pattern {pattern!r} in {setting}")
        runs.append(
            (first["labels"][rows], first["logits"][rows].float(), second["logits"][rows].float())
        )
    return name, paired_difference(runs, metric, n_resamples=n_resamples, seed=seed)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m evals.paired FOLDER... --a NAME --b NAME [--setting SLUG]``."""
    parser = argparse.ArgumentParser(
        prog="python -m evals.paired",
        description="Paired-bootstrap difference of two checkpoints' metric (b - a) over "
        "`mllm-missing eval` output folders that scored both on the same samples.",
    )
    parser.add_argument("folders", nargs="+", help="eval output folders (e.g. one per seed)")
    parser.add_argument("--a", required=True, help="the reference checkpoint's name")
    parser.add_argument("--b", required=True, help="the compared checkpoint's name")
    parser.add_argument(
        "--setting", action="append", help="setting, e.g. both-0.70-b0.50 (default: all)"
    )
    parser.add_argument(
        "--by-pattern",
        action="store_true",
        help="also one row per presence pattern (image+text, image, text)",
    )
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    args = parser.parse_args(argv)
    try:
        settings = args.setting or common_settings([Path(f) for f in args.folders], args.a, args.b)
        if not settings:
            raise DataFormatError(f"no setting has predictions of both {args.a} and {args.b}")
        print(f"| setting | runs | {args.a} | {args.b} | {args.b} - {args.a} [95 % CI] | per run |")
        print("|---|---:|---:|---:|---:|---|")
        patterns: list[str | None] = [None]
        if args.by_pattern:
            patterns += ["image+text", "image", "text"]
        for setting in settings:
            for pattern in patterns:
                try:
                    name, result = compare_folders(
                        args.folders, args.a, args.b, setting, pattern=pattern,
                        n_resamples=args.resamples, seed=args.seed,
                    )  # fmt: skip
                except DataFormatError:
                    if pattern is None:
                        raise
                    continue  # the setting has no sample of this pattern
                low, high = result.ci95
                runs = ", ".join(f"{100 * d:+.2f}" for d in result.per_run)
                label = setting + (f", {pattern} only" if pattern else "")
                print(
                    f"| {label} ({name}) | {len(result.per_run)} | {100 * result.a:.2f} | "
                    f"{100 * result.b:.2f} | {100 * result.difference:+.2f} "
                    f"[{100 * low:+.2f}, {100 * high:+.2f}] | {runs} |"
                )
    except (ConfigError, DataFormatError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
