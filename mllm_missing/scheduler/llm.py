"""The ``llm`` scheduler: a chat LLM ranks the allowed options by log-likelihood.

The LLM reads the task, the input's modality status and one line per option (its modules'
descriptions and, when known, the option's validation score on this pattern), and each option's
name is scored as the whole answer (`FrozenCausalLM.score_options`). The argmax is the decision,
so the answer is always an allowed option: nothing is generated or parsed.

With ``calibrate`` (the default) each option's log-likelihood is taken relative to the same
option list without the evidence (no task, status, descriptions or scores): a small LLM's prior
for some names (long, predictable ones such as ``learned_token+masked_attention``) otherwise
decides alone, whatever the prompt says (the surface-form competition of Holtzman et al., 2021).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Protocol

from mllm_missing.errors import ConfigError
from mllm_missing.scheduler.base import Decision, ModuleCatalog, Scheduler, status_text
from mllm_missing.scheduler.config import Option, SchedulerConfig
from mllm_missing.types import Presence

__all__ = [
    "LLMScheduler",
    "OptionScorer",
    "build_baseline_prompt",
    "build_prompt",
    "load_scheduler_llm",
]

logger = logging.getLogger(__name__)

SYSTEM = (
    "You choose the modules that process an input of a multimodal model when some of its "
    "modalities may be missing. Answer with the name of one option, nothing else."
)


class OptionScorer(Protocol):
    """What the scheduler needs of an LLM (`FrozenCausalLM` has it)."""

    def score_options(self, messages: Any, options: Any, *, reduction: str = ...) -> list[float]:
        """Log-likelihood of each option as the assistant's answer."""
        ...


def load_scheduler_llm(name: str) -> Any:
    """Load the scheduler's LLM: ``smollm2-135m-instruct`` (offline package) or a local
    transformers checkpoint folder / GGUF file.

    Raises:
        ConfigError: `name` is neither.
    """
    from mllm_missing.backbones.hf import SMOLLM2_NAME, load_causal_lm, load_smollm2

    if name == SMOLLM2_NAME:
        return load_smollm2()
    if Path(name).exists():
        return load_causal_lm(name)
    raise ConfigError(f"llm must be {SMOLLM2_NAME} or an existing local path; got {name!r}")


def build_prompt(
    task: str,
    presence: Presence,
    options: list[Option],
    catalog: ModuleCatalog,
    modalities: tuple[str, ...],
) -> list[dict[str, str]]:
    """The chat the LLM answers: task, status line, one line per option (best validated first
    when scores are known, so the listing order carries the evidence too)."""
    scores = catalog.scores
    metric = scores.metric
    lines = []
    for option in options:
        value = scores.get(option, presence)
        known = (
            f"; {scores.split_name} {metric} for this pattern: {value:.2f}"
            if value is not None
            else ""
        )
        lines.append(f"- {option.name}: {catalog.describe(option)}{known}")
    user = "\n".join(
        [
            f"Task: {task}",
            status_text(presence, modalities),
            "Options:",
            *lines,
            "Which option should process this input? Answer with the option's name.",
        ]
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def build_baseline_prompt(options: list[Option]) -> list[dict[str, str]]:
    """The same option list with no evidence: what the LLM answers from the names alone."""
    user = "\n".join(
        ["Options:", *(f"- {o.name}" for o in options),
         "Which option should process this input? Answer with the option's name."]
    )  # fmt: skip
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


class LLMScheduler(Scheduler):
    """Ranks the allowed options with a chat LLM; one LLM call per (task, pattern).

    Args:
        config: the scheduler's settings (``kind="llm"``).
        catalog: the module catalogue, with validation scores when known.
        llm: an already loaded LLM (default: `load_scheduler_llm(config.llm)` on first use).
    """

    kind = "llm"

    def __init__(
        self,
        config: SchedulerConfig,
        catalog: ModuleCatalog | None = None,
        llm: OptionScorer | None = None,
    ) -> None:
        super().__init__(config, catalog)
        self._llm = llm
        self.llm_calls = 0  # decisions the LLM was asked for (one per task and pattern)
        self.scoring_passes = 0  # score_options calls (two per decision when calibrated)
        self.llm_seconds = 0.0
        self.load_seconds = 0.0

    @property
    def llm(self) -> OptionScorer:
        """The LLM, loaded on first use."""
        if self._llm is None:
            started = time.perf_counter()
            self._llm = load_scheduler_llm(self.config.llm)
            self.load_seconds = time.perf_counter() - started
        return self._llm

    def _ordered(self, presence: Presence) -> list[Option]:
        scores = self.catalog.scores
        known = [(o, scores.get(o, presence)) for o in self.options]
        if any(s is None for _, s in known):
            return list(self.options)
        return [o for o, _ in sorted(known, key=lambda pair: -float(pair[1] or 0.0))]

    def _decide(self, presence: Presence, task: str) -> Decision:
        options = self._ordered(presence)
        messages = build_prompt(task, presence, options, self.catalog, self.config.modalities)
        llm = self.llm
        names = [o.name for o in options]
        reduction = self.config.reduction
        started = time.perf_counter()
        values = llm.score_options(messages, names, reduction=reduction)
        self.scoring_passes += 1
        if self.config.calibrate:
            prior = llm.score_options(build_baseline_prompt(options), names, reduction=reduction)
            values = [v - p for v, p in zip(values, prior)]
            self.scoring_passes += 1
        self.llm_seconds += time.perf_counter() - started
        self.llm_calls += 1
        ranked = sorted(zip(options, values), key=lambda pair: -pair[1])
        best, value = ranked[0]
        margin = (
            f", {value - ranked[1][1]:.3f} above {ranked[1][0]} ({ranked[1][1]:.3f})"
            if len(ranked) > 1
            else ""
        )
        validated = self.catalog.scores.get(best, presence)
        evidence = (
            f"; its {self.catalog.scores.split_name} {self.catalog.scores.metric} is "
            f"{validated:.4f}"
            if validated is not None
            else ""
        )
        kind = "calibrated log-likelihood" if self.config.calibrate else "log-likelihood"
        logger.info("llm scheduler, %s: %s", presence.pattern, best)
        return Decision(
            best.imputation, best.fusion, best.prompt,
            rationale=(
                f"{presence.pattern}: the LLM ranks {best} first ({kind} "
                f"{self.config.reduction} {value:.3f}{margin}){evidence}"
            ),
            source=self.kind,
            scores={o.name: float(v) for o, v in zip(options, values)},
        )  # fmt: skip
