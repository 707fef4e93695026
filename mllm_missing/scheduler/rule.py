"""The ``rule`` scheduler: per presence pattern, the allowed option with the best validation
score."""

from __future__ import annotations

from mllm_missing.errors import ConfigError
from mllm_missing.scheduler.base import Decision, Scheduler
from mllm_missing.types import Presence

__all__ = ["RuleScheduler"]


class RuleScheduler(Scheduler):
    """Picks the best validated option for each pattern (ties: the first in the allowed order).

    Raises (on a decision):
        ConfigError: no allowed option has a validation score for the pattern.
    """

    kind = "rule"

    def _decide(self, presence: Presence, task: str) -> Decision:
        scores = self.catalog.scores
        scored = [(o, scores.get(o, presence)) for o in self.options]
        ranked = [(o, s) for o, s in scored if s is not None]
        if not ranked:
            names = ", ".join(o.name for o in self.options)
            raise ConfigError(
                f"rule scheduler: no validation score for pattern {presence.pattern!r} of any "
                f"allowed option ({names}); give validation scores (e.g. the pattern_scores.json "
                "of `mllm-missing eval --split val`)"
            )
        best, value = max(ranked, key=lambda pair: pair[1])  # max keeps the first of equals
        others = sorted((s for o, s in ranked if o != best), reverse=True)
        margin = f", {value - others[0]:+.4f} over the next" if others else ""
        missing = [o.name for o, s in scored if s is None]
        unscored = f"; unscored: {', '.join(missing)}" if missing else ""
        return Decision(
            best.imputation, best.fusion, best.prompt,
            rationale=(
                f"{presence.pattern}: {best} has the best {scores.split_name} {scores.metric} "
                f"({value:.4f}{margin}){unscored}"
            ),
            source=self.kind,
            scores={o.name: s for o, s in ranked},
        )  # fmt: skip
