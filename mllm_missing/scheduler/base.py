"""What every scheduler shares: decisions, the module catalogue, validation scores, the status
text and the per-(task, pattern) cache that makes a scheduler the engine's `ModuleSelector`."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mllm_missing.errors import ConfigError, DataFormatError
from mllm_missing.inference.engine import ModuleChoice
from mllm_missing.scheduler.config import Option, SchedulerConfig
from mllm_missing.types import Presence, status_text

__all__ = [
    "Decision",
    "ModuleCatalog",
    "ModuleInfo",
    "Scheduler",
    "ValidationScores",
    "get_module_catalog",
    "load_validation_scores",
    "status_text",
]


@dataclass(frozen=True)
class Decision:
    """A scheduler's answer for one presence pattern.

    Attributes:
        imputation: the imputation to run (None: the model has none, it chooses a prompt only).
        fusion: the fusion to run (None likewise).
        prompt: for LLM backbones, ``learned`` (the learned prompts) or ``status_text`` (the
            `status_text` line in the input); None where the backbone has no prompt choice.
        rationale: one sentence saying why.
        source: the scheduler kind that decided (``llm``, ``rule``, ``fixed``).
        scores: option name -> the score it was ranked by (log-likelihood or validation score).
    """

    imputation: str | None
    fusion: str | None
    prompt: str | None
    rationale: str
    source: str
    scores: Mapping[str, float] = field(default_factory=dict, compare=False, hash=False)

    @property
    def option(self) -> Option:
        """The chosen option."""
        return Option(self.imputation, self.fusion, self.prompt)

    @property
    def choice(self) -> ModuleChoice:
        """The imputation + fusion and the prompt, as the inference engine and the chat take
        them (the classifier engine refuses a prompt)."""
        return ModuleChoice(self.imputation, self.fusion, self.prompt)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "option": self.option.name,
            "imputation": self.imputation,
            "fusion": self.fusion,
            "prompt": self.prompt,
            "rationale": self.rationale,
            "source": self.source,
            "scores": dict(self.scores),
        }


@dataclass(frozen=True)
class ModuleInfo:
    """One registered module: its kind (``imputation`` / ``fusion``), name and description."""

    kind: str
    name: str
    description: str


@dataclass(frozen=True)
class ValidationScores:
    """Validation scores per option and presence pattern (never test scores).

    Attributes:
        metric: the metric's name (e.g. ``accuracy``).
        scores: option name -> pattern (``image+text``, ``text``, ...) -> score.
        split: the split they were measured on.
    """

    metric: str = "score"
    scores: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    split: str = "val"

    @property
    def split_name(self) -> str:
        """How rationales name the split: ``validation``, or the split itself (e.g. ``test``
        when a caller falls back to test scores and says so)."""
        return "validation" if self.split in ("val", "validation") else self.split

    def get(self, option: Option, presence: Presence) -> float | None:
        """The score of `option` on `presence`'s pattern, or None."""
        by_pattern = self.scores.get(option.name)
        if by_pattern is None and option.prompt is None:
            return None
        if by_pattern is None and option.imputation is not None:
            # A score of the pair alone stands for each prompt choice.
            by_pattern = self.scores.get(f"{option.imputation}+{option.fusion}")
        value = None if by_pattern is None else by_pattern.get(presence.pattern)
        return None if value is None else float(value)

    def to_dict(self) -> dict[str, Any]:
        """The JSON layout `load_validation_scores` reads."""
        return {"metric": self.metric, "split": self.split,
                "scores": {k: dict(v) for k, v in self.scores.items()}}  # fmt: skip


def load_validation_scores(path: str | Path) -> ValidationScores:
    """Read ``{"metric": ..., "split": ..., "scores": {option: {pattern: score}}}`` (the file
    `mllm-missing eval` writes as ``pattern_scores.json``).

    Raises:
        DataFormatError: the file is not in that layout.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataFormatError(f"validation scores {path}: cannot read ({exc})") from None
    scores = data.get("scores") if isinstance(data, dict) else None
    if not isinstance(scores, dict) or not all(
        isinstance(v, dict) and all(isinstance(s, (int, float)) for s in v.values())
        for v in scores.values()
    ):
        raise DataFormatError(
            f"validation scores {path}: expected {{'scores': {{option: {{pattern: number}}}}}}"
        )
    return ValidationScores(
        str(data.get("metric", "score")),
        {k: {p: float(s) for p, s in v.items()} for k, v in scores.items()},
        str(data.get("split", "val")),
    )


@dataclass(frozen=True)
class ModuleCatalog:
    """A view of the module registries: every imputation and fusion with its one-line
    description, and (when given) validation scores per presence pattern."""

    modules: tuple[ModuleInfo, ...]
    scores: ValidationScores = field(default_factory=ValidationScores)

    def description(self, kind: str, name: str) -> str:
        """The description of module `name` of `kind`."""
        for info in self.modules:
            if info.kind == kind and info.name == name:
                return info.description
        raise KeyError(f"no {kind} module {name!r}")

    def describe(self, option: Option) -> str:
        """One line naming the option's modules and what they do."""
        parts = []
        if option.imputation is not None and option.fusion is not None:
            parts += [
                f"imputation {option.imputation} "
                f"({self.description('imputation', option.imputation)})",
                f"fusion {option.fusion} ({self.description('fusion', option.fusion)})",
            ]
        if option.prompt == "learned":
            parts.append("prompt: the learned missing-aware prompts")
        elif option.prompt == "status_text":
            parts.append("prompt: a text line stating which modalities are missing")
        return "; ".join(parts)


def get_module_catalog(scores: ValidationScores | None = None) -> ModuleCatalog:
    """The catalogue of every registered imputation and fusion (their ``description``)."""
    from mllm_missing.registry import load_all
    from mllm_missing.strategies.fusion import FUSIONS
    from mllm_missing.strategies.imputation import IMPUTATIONS

    modules = [
        ModuleInfo(kind, name, str(getattr(cls, "description", "") or name))
        for kind, registry in (("imputation", IMPUTATIONS), ("fusion", FUSIONS))
        for name, cls in load_all(registry).items()
    ]
    return ModuleCatalog(tuple(modules), scores or ValidationScores())


class Scheduler:
    """Base class: a decision per (task, presence pattern), computed once and cached.

    A scheduler is a `ModuleSelector`: ``scheduler(presence)`` returns the `ModuleChoice`, so it
    plugs into `InferenceEngine(model, selector=scheduler, candidates=...)`.

    Args:
        config: the scheduler's settings.
        catalog: the module catalogue (default: the registries, no validation scores).
    """

    kind: ClassVar[str] = ""

    def __init__(self, config: SchedulerConfig, catalog: ModuleCatalog | None = None) -> None:
        if config.kind != self.kind:
            raise ConfigError(f"kind must be {self.kind!r} for {type(self).__name__}; got "
                              f"{config.kind!r}")  # fmt: skip
        self.config = config
        self.catalog = catalog or get_module_catalog()
        self.options = config.allowed_options()
        self._cache: dict[tuple[str, str], Decision] = {}
        self._lock = threading.Lock()
        self.cache_hits = 0
        self.cache_misses = 0

    def decide(self, presence: Presence, task: str | None = None) -> Decision:
        """The decision for `presence` on `task` (default: the configured task), cached."""
        key = (task or self.config.task, presence.pattern)
        with self._lock:  # one decision per key even when engine threads ask at once
            cached = self._cache.get(key)
            if cached is not None:
                self.cache_hits += 1
                return cached
            self.cache_misses += 1
            decision = self._decide(presence, key[0])
            if decision.option not in self.options:  # a bug in a subclass, never the LLM
                raise RuntimeError(f"{self.kind} scheduler returned {decision.option}, not allowed")
            self._cache[key] = decision
            return decision

    def __call__(self, presence: Presence) -> ModuleChoice:
        """The engine's `ModuleSelector` call: the chosen imputation + fusion (+ prompt)."""
        return self.decide(presence).choice

    def decisions(self) -> dict[tuple[str, str], Decision]:
        """Every cached decision by (task, pattern)."""
        with self._lock:
            return dict(self._cache)

    def _decide(self, presence: Presence, task: str) -> Decision:
        raise NotImplementedError
