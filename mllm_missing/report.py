"""Result files of a run: results.json (with config and versions), a markdown table and a plot."""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from mllm_missing.atomic import atomic_write_text

__all__ = ["environment_versions", "plot_metric_vs_rate", "summary_table", "write_results"]

_PACKAGES = ("mllm-missing", "torch", "transformers", "datasets", "sentence-transformers", "numpy")


def environment_versions() -> dict[str, str]:
    """Versions of Python and of the packages that shape the numbers."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _setting_label(kind: str, rate: float) -> str:
    if rate == 0:
        return "none (all present)"
    if rate == 1.0 and kind in ("text", "image"):
        other = "image" if kind == "text" else "text"
        return f"{kind} 100% ({other} only)"
    return f"{kind} {rate:.0%}"


def summary_table(results: Mapping[str, Any]) -> str:
    """Markdown table: one row per test missing setting, one column per method (best in bold)."""
    rows = results["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    settings = list(dict.fromkeys((r["missing_type"], r["missing_rate"]) for r in rows))
    value = {(r["method"], r["missing_type"], r["missing_rate"]): r["value"] for r in rows}
    metric = results.get("metric", "metric")
    lines = [
        f"| test missing ({metric}, %) | " + " | ".join(methods) + " |",
        "|---|" + "---:|" * len(methods),
    ]
    for kind, rate in settings:
        scores = [value[(m, kind, rate)] for m in methods]
        best = max(scores)
        cells = [
            f"**{100 * s:.2f}**" if s == best and len(methods) > 1 else f"{100 * s:.2f}"
            for s in scores
        ]
        lines.append(f"| {_setting_label(kind, rate)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_metric_vs_rate(results: Mapping[str, Any], path: str | Path) -> Path:
    """PNG of the metric against the test missing rate: one panel per missing type, one line
    per method (the 0 % point is shared by every panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    kinds = [k for k in dict.fromkeys(r["missing_type"] for r in rows if 0 < r["missing_rate"] < 1)]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    full = {r["method"]: r["value"] for r in rows if r["missing_rate"] == 0}
    figure, axes = plt.subplots(1, max(len(kinds), 1), figsize=(4.2 * max(len(kinds), 1), 3.6))
    axes_list = list(axes) if hasattr(axes, "__len__") else [axes]
    for axis, kind in zip(axes_list, kinds):
        for method in methods:
            points = sorted(
                (r["missing_rate"], r["value"])
                for r in rows
                if r["method"] == method and r["missing_type"] == kind and r["missing_rate"] < 1
            )
            if method in full:
                points = [(0.0, full[method]), *points]
            axis.plot(
                [p[0] for p in points], [100 * p[1] for p in points], marker="o", label=method
            )
        axis.set_title(f"missing {kind}")
        axis.set_xlabel("test missing rate")
        axis.grid(alpha=0.3)
    axes_list[0].set_ylabel(f"{results.get('metric', 'metric')} (%)")
    axes_list[0].legend()
    figure.suptitle(f"{results.get('task', '')}: trained at {results.get('train_label', '')}")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_results(results: dict[str, Any], output_dir: str | Path) -> dict[str, Path]:
    """Write results.json (adding environment versions), results.md and the plot.

    Returns:
        The paths written, by kind (``json``, ``markdown``, ``plot``).
    """
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    results.setdefault("versions", environment_versions())
    paths = {
        "json": output / "results.json",
        "markdown": output / "results.md",
        "plot": output / f"{results.get('metric', 'metric')}_vs_missing.png",
    }
    atomic_write_text(paths["json"], json.dumps(results, indent=2, sort_keys=True) + "\n")
    atomic_write_text(paths["markdown"], summary_table(results) + "\n")
    plot_metric_vs_rate(results, paths["plot"])
    return paths
