"""The paired comparison of two checkpoints' kept predictions (`python -m evals.paired`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evals.paired import compare_folders, main, paired_difference
from mllm_missing.errors import DataFormatError


def accuracy(labels: torch.Tensor, logits: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


def run(n: int, wrong_a: int, fixed_by_b: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Labels and two methods' logits: a is wrong on `wrong_a` samples, b is a but right on
    `fixed_by_b` of those."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=generator)
    first = torch.nn.functional.one_hot(labels, 3).float()
    wrong = torch.randperm(n, generator=generator)[:wrong_a]
    first[wrong] = torch.nn.functional.one_hot((labels[wrong] + 1) % 3, 3).float()
    second = first.clone()
    second[wrong[:fixed_by_b]] = torch.nn.functional.one_hot(labels[wrong[:fixed_by_b]], 3).float()
    return labels, first, second


def test_the_same_predictions_differ_by_exactly_nothing() -> None:
    labels, first, _ = run(200, 60, 0)
    result = paired_difference([(labels, first, first)], accuracy, n_resamples=200)
    assert result.difference == 0.0 and result.ci95 == (0.0, 0.0)


def test_pairing_resolves_a_gain_the_marginal_intervals_cannot() -> None:
    """b fixes 20 of a's 350 errors on 1,000 samples and breaks none: +2 points. Each method's
    own 95 % interval is about +-3 points wide, so they overlap; the paired one excludes 0."""
    from mllm_missing.metrics import bootstrap_ci

    labels, first, second = run(1000, 350, 20)
    result = paired_difference([(labels, first, second)], accuracy, n_resamples=500)
    assert result.difference == pytest.approx(0.02, abs=1e-6)
    assert 0.0 < result.ci95[0] <= 0.02 <= result.ci95[1]

    def metric(y: object, s: object) -> float:
        return accuracy(torch.as_tensor(y), torch.as_tensor(s))

    a_high = bootstrap_ci(metric, labels.numpy(), first.numpy(), n_resamples=300)[1]
    b_low = bootstrap_ci(metric, labels.numpy(), second.numpy(), n_resamples=300)[0]
    assert b_low < a_high  # the marginal intervals overlap


def test_runs_are_pooled_by_their_mean_difference() -> None:
    runs = [run(500, 150, 10, seed=0), run(500, 150, 0, seed=1)]
    result = paired_difference(runs, accuracy, n_resamples=200)
    assert result.per_run == pytest.approx((0.02, 0.0), abs=1e-6)
    assert result.difference == pytest.approx(0.01, abs=1e-6) and result.samples == (500, 500)
    with pytest.raises(ValueError, match="same non-empty samples"):
        paired_difference([(runs[0][0], runs[0][1], runs[0][2][:10])], accuracy)


def write_folder(folder: Path, methods: dict[str, tuple[torch.Tensor, ...]], seed: int = 0) -> Path:
    (folder / "eval_config.json").parent.mkdir(parents=True, exist_ok=True)
    (folder / "eval_config.json").write_text(json.dumps({"task": "easy_vqa"}))
    for name, (labels, logits, presence) in methods.items():
        path = folder / "logits" / name / f"both-0.70-b0.50-s{seed}.pt"
        path.parent.mkdir(parents=True)
        torch.save({"labels": labels, "logits": logits, "presence": presence}, path)
    return folder


def test_folders_are_compared_and_mismatches_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels, first, second = run(300, 90, 9)
    presence = torch.tensor([[True, True, False]]).repeat(300, 1)
    good = write_folder(
        tmp_path / "seed0", {"zero": (labels, first, presence), "knn": (labels, second, presence)}
    )
    name, result = compare_folders([good], "zero", "knn", "both-0.70-b0.50", n_resamples=100)
    assert name == "accuracy" and result.difference == pytest.approx(0.03, abs=1e-6)
    assert main([str(good), "--a", "zero", "--b", "knn", "--resamples", "100"]) == 0
    table = capsys.readouterr().out
    assert "| both-0.70-b0.50 (accuracy) | 1 |" in table and "+3.00" in table
    # Folders scored with other mask seeds pair up by setting.
    labels1, first1, second1 = run(300, 90, 0, seed=1)
    seed1 = write_folder(
        tmp_path / "seed1",
        {"zero": (labels1, first1, presence), "knn": (labels1, second1, presence)},
        seed=1,
    )
    _, pooled = compare_folders([good, seed1], "zero", "knn", "both-0.70-b0.50-s0")
    assert pooled.per_run == pytest.approx((0.03, 0.0), abs=1e-6)

    # Per presence pattern: a's errors b fixes all lie in the rows marked image-only here.
    only_image = presence.clone()
    fixed = (second.argmax(1) == labels) & (first.argmax(1) != labels)
    only_image[fixed, 1] = False
    patterned = write_folder(
        tmp_path / "patterns",
        {"zero": (labels, first, only_image), "knn": (labels, second, only_image)},
    )
    _, image_rows = compare_folders([patterned], "zero", "knn", "both-0.70-b0.50", pattern="image")
    _, complete = compare_folders(
        [patterned], "zero", "knn", "both-0.70-b0.50", pattern="image+text"
    )
    assert image_rows.difference == pytest.approx(1.0) and complete.difference == 0.0
    assert image_rows.samples == (9,)
    assert main([str(patterned), "--a", "zero", "--b", "knn", "--by-pattern"]) == 0
    assert "image only (accuracy) | 1 | 0.00 | 100.00 | +100.00" in capsys.readouterr().out

    other = presence.clone()
    other[0, 0] = False
    bad = write_folder(
        tmp_path / "bad", {"zero": (labels, first, presence), "knn": (labels, second, other)}
    )
    with pytest.raises(DataFormatError, match="different presence"):
        compare_folders([bad], "zero", "knn", "both-0.70-b0.50")
    with pytest.raises(DataFormatError, match="no predictions of translator .*: knn, zero"):
        compare_folders([good], "zero", "translator", "both-0.70-b0.50")
    assert main([str(good), "--a", "zero", "--b", "translator"]) == 2
    assert "no setting has predictions of both" in capsys.readouterr().err
