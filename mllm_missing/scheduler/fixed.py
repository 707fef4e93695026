"""The ``fixed`` scheduler: the same option for every presence pattern (the comparison point)."""

from __future__ import annotations

from mllm_missing.scheduler.base import Decision, Scheduler
from mllm_missing.scheduler.config import Option
from mllm_missing.types import Presence

__all__ = ["FixedScheduler"]


class FixedScheduler(Scheduler):
    """Returns `SchedulerConfig.fixed` whatever the input."""

    kind = "fixed"

    def _decide(self, presence: Presence, task: str) -> Decision:
        option = Option.parse(str(self.config.fixed), field="fixed")
        return Decision(
            option.imputation, option.fusion, option.prompt,
            rationale=f"{presence.pattern}: {option} is fixed for every pattern",
            source=self.kind,
        )  # fmt: skip
