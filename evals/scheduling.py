"""Schedulers in the evaluation runner: per-pattern scores of each checkpoint, and rows where each
sample's presence pattern is routed to the checkpoint a scheduler picked for that pattern.

Every candidate checkpoint is scored by the runner's own path (`evaluate_missing`'s pieces), which
also saves its logits per setting; a scheduler row takes, for each sample, the logits of the
checkpoint chosen for the sample's pattern (what `InferenceEngine(selector=scheduler,
candidates=...)` runs), and is scored by the same `score_missing`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mllm_missing.errors import ConfigError
from mllm_missing.types import Presence

__all__ = [
    "TASK_DESCRIPTIONS",
    "PredictionKeeper",
    "pattern_metrics",
    "pattern_scores",
    "scheduler_rows",
    "schedulers_markdown",
]

logger = logging.getLogger(__name__)

#: What the LLM scheduler is told the task is.
TASK_DESCRIPTIONS = {
    "easy_vqa": "easy-VQA: answer a question about a picture of one coloured shape "
    "(13 answers; the answer needs both the image and the question)",
    "mmimdb": "MM-IMDb: predict a movie's genres from its poster and plot (multi-label)",
    "hateful_memes": "Hateful Memes: tell whether a meme (image + caption) is hateful",
}


def pattern_metrics(
    task: Any, labels: torch.Tensor, logits: torch.Tensor, presence: torch.Tensor
) -> dict[str, dict[str, float]]:
    """The headline metric per presence pattern: ``{pattern: {"n": count, "value": metric}}``
    (a pattern whose subset the metric cannot score, e.g. AUROC on one class, is left out)."""
    from mllm_missing.training.supervised import score

    codes: dict[str, list[int]] = {}
    for i, row in enumerate(presence.tolist()):
        codes.setdefault(Presence.from_flags(row).pattern, []).append(i)
    out = {}
    for pattern, rows in sorted(codes.items()):
        index = torch.tensor(rows)
        try:
            value = score(task, labels[index], logits[index])[task.metric]
        except ValueError:
            continue
        out[pattern] = {"n": float(len(rows)), "value": float(value)}
    return out


def _option_names(methods: Sequence[Any]) -> dict[str, str]:
    """method name -> its option ``imputation+fusion`` (from the checkpoint's spec)."""
    return {
        m.name: f"{m.spec.get('imputation', 'zero')}+{m.spec.get('fusion', 'concat')}"
        for m in methods
    }


def pattern_scores(
    task: Any, split: str, methods: Sequence[Any], rows: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Per option, its metric per pattern pooled over the run's settings (sample-weighted: exact
    for accuracy), in the layout `mllm_missing.scheduler.load_validation_scores` reads."""
    options = _option_names(methods)
    totals: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        by_pattern = totals.setdefault(row["method"], {})
        for pattern, entry in row.get("patterns", {}).items():
            acc = by_pattern.setdefault(pattern, [0.0, 0.0])
            acc[0] += entry["n"] * entry["value"]
            acc[1] += entry["n"]
    scores: dict[str, dict[str, float]] = {}
    for method, by_pattern in totals.items():
        option = options[method]
        if option in scores:
            logger.warning("pattern scores: two checkpoints are %s; keeping the first", option)
            continue
        scores[option] = {p: s / n for p, (s, n) in by_pattern.items() if n}
    return {"metric": task.metric, "split": split, "methods": options, "scores": scores}


def scheduler_rows(
    config: Any,
    task: Any,
    methods: Sequence[Any],
    settings: Sequence[Any],
    load_logits: Any,
    *,
    llm: Any = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One row per (scheduler, setting), and per scheduler its decisions and costs.

    Args:
        config: the `EvalConfig` (``schedulers``, ``fixed``, ``validation_scores``, ...).
        task: the task's `TaskInfo`.
        methods: the candidate checkpoints (distinct imputation + fusion pairs).
        settings: the test settings.
        load_logits: ``(method, setting) -> {"labels", "logits", "presence"}``.
        llm: an already loaded LLM for the ``llm`` scheduler (tests).
    """
    from mllm_missing.scheduler import SchedulerConfig, build_scheduler, load_validation_scores
    from mllm_missing.training.supervised import score_missing

    options = _option_names(methods)
    by_option: dict[str, Any] = {}
    for method in methods:
        other = by_option.setdefault(options[method.name], method)
        if other is not method:
            raise ConfigError(
                f"scheduler: checkpoints {other.name} and {method.name} are both "
                f"{options[method.name]}; give one checkpoint per imputation+fusion pair"
            )
    scores = load_validation_scores(config.validation_scores) if config.validation_scores else None
    description = config.scheduler_task or TASK_DESCRIPTIONS.get(task.name, task.name)
    trained = sorted({m.train_missing for m in methods})
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for kind in config.schedulers:
        scheduler_config = SchedulerConfig(
            kind=kind, task=description, modalities=tuple(m.value for m in task.modalities),
            options=tuple(by_option), fixed=config.fixed or options[methods[0].name],
            llm=config.scheduler_llm,
        )  # fmt: skip
        scheduler = build_scheduler(scheduler_config, scores=scores, llm=llm)
        spent = 0.0
        for setting in settings:
            loaded = {m.name: load_logits(m, setting) for m in methods}
            first = loaded[methods[0].name]
            presence, labels = first["presence"], first["labels"]
            logits = torch.empty_like(first["logits"])
            for code in torch.unique(presence, dim=0):
                rows_of = (presence == code).all(dim=1)
                started = time.perf_counter()
                decision = scheduler.decide(Presence.from_flags(code))
                spent += time.perf_counter() - started
                method = by_option[decision.option.name]
                logits[rows_of] = loaded[method.name]["logits"][rows_of]
            row = score_missing(task, setting, labels, logits, config.seed, config.bootstrap)
            row.update(
                method=f"scheduler-{kind}",
                train_missing=trained[0] if len(trained) == 1 else "mixed",
                patterns=pattern_metrics(task, labels, logits, presence),
            )
            rows.append(row)
        summary[kind] = {
            "decisions": {p: d.to_dict() for (_, p), d in sorted(scheduler.decisions().items())},
            "decision_seconds": spent,
            "llm_calls": getattr(scheduler, "llm_calls", 0),
            "llm_load_seconds": getattr(scheduler, "load_seconds", 0.0),
            "validation_scores": str(config.validation_scores or ""),
        }
    return rows, summary


def schedulers_markdown(summary: Mapping[str, Any], methods: Sequence[Any]) -> str:
    """The decisions table: per scheduler and pattern, the option chosen and why."""
    options = _option_names(methods)
    lines = [
        "## Schedulers: the checkpoint chosen per presence pattern",
        "",
        "Candidates: " + ", ".join(f"{name} ({option})" for name, option in options.items()),
        "",
        "| scheduler | pattern | chosen | why |",
        "|---|---|---|---|",
    ]
    for kind, entry in summary.items():
        for pattern, decision in entry["decisions"].items():
            lines.append(f"| {kind} | {pattern} | {decision['option']} | {decision['rationale']} |")
    costs = [
        f"{kind}: {e['llm_calls']} LLM call(s), {e['decision_seconds']:.2f} s deciding"
        + (f" (+ {e['llm_load_seconds']:.1f} s loading the LLM)" if e["llm_load_seconds"] else "")
        for kind, e in summary.items()
    ]
    return "\n".join([*lines, "", "Cost: " + "; ".join(costs) + "."])


class PredictionKeeper:
    """`evaluate_missing`'s ``on_predictions``: keeps one (checkpoint, setting)'s predictions on
    disk for the scheduler rows (and resumed runs) and its per-pattern metrics.

    Args:
        task: the task's `TaskInfo`.
        path: the ``.pt`` file written.
    """

    def __init__(self, task: Any, path: Path) -> None:
        self.task, self.path = task, path
        self.patterns: dict[str, dict[str, float]] = {}

    def __call__(self, split: Any, logits: torch.Tensor) -> None:
        self.patterns = pattern_metrics(self.task, split.labels, logits, split.presence)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"labels": split.labels, "logits": logits, "presence": split.presence}
        tmp = self.path.with_suffix(".tmp")
        torch.save(payload, tmp)
        tmp.replace(self.path)
