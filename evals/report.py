"""Result files of an evaluation run: results.json, results.md (tables, robustness, anchors), plot.

Everything in results.md and every number in results.json except ``timing`` depends only on the
settings, the checkpoints and the data, so two runs with the same seed write identical tables.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from evals.anchors import ANCHOR_SETTING, ANCHORS, anchors_for
from mllm_missing.atomic import atomic_write_text
from mllm_missing.report import environment_versions, plot_metric_vs_rate, summary_table

__all__ = ["anchor_comparison", "robustness", "write_eval_results"]

_TITLES = {"mmimdb": "MM-IMDb", "hateful_memes": "Hateful Memes", "easy_vqa": "easy-VQA"}


def _describe(setting: str) -> str:
    from mllm_missing.errors import ConfigError
    from mllm_missing.missing import MissingConfig

    try:
        config = MissingConfig.parse(setting)
    except ConfigError:
        return setting
    return "none missing" if config.rate == 0 else config.describe().split(" (")[0]


def _test_label(row: Mapping[str, Any]) -> str:
    kind, rate = row["missing_type"], row["missing_rate"]
    if rate == 0:
        return "none missing (all present)"
    if rate == 1.0 and kind in ("text", "image"):
        return f"{kind} 100% ({'image' if kind == 'text' else 'text'} only)"
    return str(row["missing"])


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def _ci(row: Mapping[str, Any]) -> str:
    low, high = row["ci95"]
    return f"[{_pct(low)}, {_pct(high)}]"


def robustness(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per method and missing type: the metric at 70 % missing over the metric with every
    modality present (only where both settings were scored)."""
    full = {r["method"]: r for r in rows if r["missing_rate"] == 0}
    out = []
    for row in rows:
        if row["missing_rate"] != 0.7 or row["method"] not in full:
            continue
        base = full[row["method"]]["value"]
        out.append(
            {
                "method": row["method"],
                "train_missing": row["train_missing"],
                "missing_type": row["missing_type"],
                "full": base,
                "at_70": row["value"],
                "ratio": row["value"] / base if base else float("nan"),
            }
        )
    return out


def _main_table(rows: Sequence[Mapping[str, Any]], metric: str, others: Sequence[str]) -> str:
    head = f"| method | train | test | {metric} (%) | 95 % CI |" + "".join(
        f" {m} (%) |" for m in others
    )
    lines = [head, "|---|---|---|---:|---|" + "---:|" * len(others)]
    for r in rows:
        cells = [
            r["method"], _describe(r["train_missing"]), _test_label(r), _pct(r["value"]), _ci(r),
            *(_pct(r["metrics"][m]) for m in others),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _robustness_table(ratios: Sequence[Mapping[str, Any]], metric: str) -> str:
    lines = [
        f"| method | train | missing type | {metric} all present (%) | at 70 % (%) | ratio |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in ratios:
        lines.append(
            f"| {r['method']} | {_describe(r['train_missing'])} | {r['missing_type']} | "
            f"{_pct(r['full'])} | {_pct(r['at_70'])} | {r['ratio']:.3f} |"
        )
    return "\n".join(lines)


def anchor_comparison(task: str, metric: str, rows: Sequence[Mapping[str, Any]],
                      text_mode: str | None) -> str:  # fmt: skip
    """Markdown: our rows at the anchors' setting next to the published figures."""
    kind, rate = ANCHOR_SETTING
    anchors = anchors_for(task)
    title = "## Published figures (not re-run here) next to this run"
    if not anchors:
        covered = sorted({f"{a.dataset} {a.metric}" for a in ANCHORS})
        return (
            f"{title}\n\nNo published anchors cover {_TITLES.get(task, task)}: the anchors "
            f"(MAP, DCP, SyP, MoRA) report {', '.join(covered)} at missing-both 70 %."
        )
    ours = [r for r in rows if r["missing_type"] == kind and r["missing_rate"] == rate]
    lines = [
        title,
        "",
        f"{_TITLES.get(task, task)}, {metric} (%), the anchors' setting: missing-both 70 % at "
        "train and test (35 % of samples lose text, 35 % lose image). Published rows are "
        "figures quoted from the papers, not re-runs.",
        "",
        "| source | method | backbone | train | test | " + f"{metric} (%) |",
        "|---|---|---|---|---|---:|",
    ]
    for r in ours:
        lines.append(
            f"| this run | {r['method']} | {r.get('backbone', '')} | "
            f"{_describe(r['train_missing'])} | missing-both 70% | {_pct(r['value'])} {_ci(r)} |"
        )
    for a in anchors:
        note = f" ({a.note})" if a.note else ""
        lines.append(
            f"| published, not re-run | {a.method} ({a.source}){note} | {a.backbone} | "
            f"missing-both 70% | missing-both 70% | {a.value:.2f} |"
        )
    notes = []
    if not ours:
        notes.append("This run has no missing-both 70 % row: add --missing both:0.7.")
    off = sorted({r["method"] for r in ours if r["train_missing"] != "both:0.7"})
    if off:
        notes.append(
            f"Not trained at the anchors' setting: {', '.join(off)} (see the train column)."
        )
    if task == "mmimdb":
        notes.append(
            f"This run counts MM-IMDb samples per {text_mode or 'movie'}; MAP and DCP count one "
            "sample per (movie, plot) pair (--text-mode plot), the others one per movie."
        )
    return "\n".join(lines + (["", *notes] if notes else []))


def write_eval_results(
    config: Any,
    task: Any,
    methods: Sequence[Any],
    settings: Sequence[Any],
    rows: list[dict[str, Any]],
    samples: int,
    *,
    timing: Mapping[str, Any],
    schedulers: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write results.json, results.md and ``<metric>_vs_missing.png`` into the output folder.

    `schedulers` (kind -> decisions and costs, see `evals.scheduling.scheduler_rows`) adds the
    table of each scheduler's choice per presence pattern; their rows are in `rows`.

    Returns:
        The results (as in results.json) plus ``markdown`` (what results.md holds).
    """
    metric = task.metric
    backbones = {m.name: m.spec.get("backbone", "") for m in methods}
    for row in rows:
        row["value"] = row["metrics"][metric]
        row["backbone"] = backbones.get(row["method"], "")
    others = [m for m in rows[0]["metrics"] if m != metric] if rows else []
    ratios = robustness(rows)
    trained = sorted({_describe(m.train_missing) for m in methods})
    sections = [
        f"# {_TITLES.get(task.name, task.name)} ({config.split}, {samples} samples): "
        f"{metric} under missing modalities",
        "Masks: seeded tables (seed "
        f"{config.seed}); 95 % CI: {config.bootstrap} bootstrap resamples over samples.",
        "## Results\n\n" + _main_table(rows, metric, others),
        "## By test setting (columns: methods)\n\n"
        + summary_table({"rows": rows, "metric": metric}),
    ]
    if ratios:
        sections.append(
            f"## Robustness: {metric} at 70 % missing / {metric} with every modality\n\n"
            + _robustness_table(ratios, metric)
        )
    if schedulers:
        from evals.scheduling import schedulers_markdown

        sections.append(schedulers_markdown(schedulers, methods))
    if config.compare:
        sections.append(anchor_comparison(task.name, metric, rows, config.text_mode))
    markdown = "\n\n".join(sections) + "\n"
    results: dict[str, Any] = {
        "task": task.name,
        "split": config.split,
        "metric": metric,
        "samples": samples,
        "config": dataclasses.asdict(config),
        "settings": [s.slug for s in settings],
        "methods": [
            {
                "name": m.name,
                "checkpoint": str(m.path),
                "fingerprint": m.fingerprint,
                "train_missing": m.train_missing,
                "training": m.training,
                "model": {k: v for k, v in m.spec.items() if k != "training"},
            }
            for m in methods
        ],
        "rows": rows,
        "robustness": ratios,
        "train_label": ", ".join(trained),
        "versions": environment_versions(),
        "timing": dict(timing),
    }
    if schedulers:
        results["schedulers"] = dict(schedulers)
    if config.compare:
        results["anchors"] = [dataclasses.asdict(a) for a in anchors_for(task.name)]
    output = Path(config.output_dir)
    atomic_write_text(output / "results.json", json.dumps(results, indent=2, sort_keys=True) + "\n")
    atomic_write_text(output / "results.md", markdown)
    plot_metric_vs_rate(results, output / f"{metric}_vs_missing.png")
    return {**results, "markdown": markdown}
