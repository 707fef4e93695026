"""Tests of the result files: JSON with versions, markdown table, plot."""

from __future__ import annotations

import json
from pathlib import Path

from mllm_missing.report import summary_table, write_results

RESULTS = {
    "task": "toy",
    "metric": "accuracy",
    "train_label": "both 70% missing",
    "rows": [
        {"method": "zero", "missing_type": "both", "missing_rate": 0.0, "value": 0.9},
        {"method": "zero", "missing_type": "both", "missing_rate": 0.7, "value": 0.5},
        {"method": "zero", "missing_type": "text", "missing_rate": 1.0, "value": 0.3},
        {"method": "learned", "missing_type": "both", "missing_rate": 0.0, "value": 0.8},
        {"method": "learned", "missing_type": "both", "missing_rate": 0.7, "value": 0.6},
        {"method": "learned", "missing_type": "text", "missing_rate": 1.0, "value": 0.3},
    ],
}


def test_summary_table_rows_columns_and_bold_best() -> None:
    lines = summary_table(RESULTS).splitlines()
    assert lines[0] == "| test missing (accuracy, %) | zero | learned |"
    assert lines[2] == "| none (all present) | **90.00** | 80.00 |"
    assert lines[3] == "| both 70% | 50.00 | **60.00** |"
    assert lines[4] == "| text 100% (image only) | **30.00** | **30.00** |"


def test_write_results_files(tmp_path: Path) -> None:
    paths = write_results(dict(RESULTS), tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert data["rows"] == RESULTS["rows"] and "torch" in data["versions"]
    assert paths["markdown"].read_text().startswith("| test missing")
    assert paths["plot"].name == "accuracy_vs_missing.png"
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "out").glob(".*partial*"))
