"""End-to-end test of the quickstart on a slice of easy-VQA with the real offline encoders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mllm_missing.cli import main
from mllm_missing.errors import ConfigError
from mllm_missing.quickstart import QuickstartConfig, run_quickstart

pytestmark = pytest.mark.slow


def _config(output: Path, cache: Path) -> QuickstartConfig:
    return QuickstartConfig(
        epochs=8,
        limit_train=6000,
        limit_test=800,
        image_size=64,
        test_rates=(0.0, 0.7),
        output_dir=str(output),
        cache_dir=str(cache),
    )


def test_quickstart_writes_results_and_is_reproducible(tmp_path: Path) -> None:
    first = run_quickstart(_config(tmp_path / "a", tmp_path / "cache"))
    second = run_quickstart(_config(tmp_path / "b", tmp_path / "cache"))
    assert first["rows"] == second["rows"]
    for name in ("results.json", "results.md", "accuracy_vs_missing.png"):
        assert (tmp_path / "a" / name).is_file()
    masks_a = sorted((tmp_path / "a" / "masks").rglob("*.csv"))
    masks_b = sorted((tmp_path / "b" / "masks").rglob("*.csv"))
    assert [p.name for p in masks_a] == [p.name for p in masks_b] and len(masks_a) == 7
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(masks_a, masks_b))
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["samples"] == {"train": 6000, "test": 800}
    assert saved["config"]["epochs"] == 8 and "torch" in saved["versions"]
    methods = {r["method"] for r in saved["rows"]}
    assert methods == {"zero", "learned_token", "missing_aware"}
    full = {r["method"]: r["value"] for r in saved["rows"] if r["missing_rate"] == 0}
    image_only = {
        r["method"]: r["value"]
        for r in saved["rows"]
        if r["missing_type"] == "text" and r["missing_rate"] == 1.0
    }
    # Even a short run learns far more than the majority answer (~37 %) from both inputs.
    assert all(full[m] > image_only[m] + 0.1 for m in methods)


def test_cli_prints_table_and_rejects_bad_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["quickstart", "--epochs", "1", "--limit-train", "600", "--limit-test", "200"]
    args += ["--image-size", "64", "--output-dir", str(tmp_path / "o")]
    args += ["--cache-dir", str(tmp_path / "c"), "--methods", "zero"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| none (all present) |" in out and "| both 70% |" in out
    assert main(["quickstart", "--epochs", "0"]) == 2
    assert "epochs must be positive" in capsys.readouterr().err
    assert main(["quickstart", "--train-missing", "both:1.5"]) == 2
    assert "missing.rate" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="use one of zero, learned_token, missing_aware"):
        QuickstartConfig(methods=("median",))


def test_method_names_resolve_to_pairs() -> None:
    from mllm_missing.quickstart import METHODS, resolve_method

    assert resolve_method("missing_aware") is METHODS["missing_aware"]
    pair = resolve_method("translator+gated+routed")
    assert (pair.imputation, pair.fusion, pair.routed) == ("translator", "gated", True)
    with pytest.raises(ConfigError, match="IMPUTATION\\+FUSION"):
        resolve_method("translator")
    with pytest.raises(ConfigError, match="fusion.method"):
        resolve_method("zero+sum")
