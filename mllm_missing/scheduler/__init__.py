"""Discrete scheduler: per presence pattern, choose which imputation and fusion module run.

Three kinds behind one interface (each is the inference engine's `ModuleSelector`, cached per
(task, presence pattern)): ``llm`` (a chat LLM ranks the allowed options by log-likelihood),
``rule`` (best validation score per pattern) and ``fixed``. Build one with
`build_scheduler(SchedulerConfig(...), scores=...)`.
"""

from __future__ import annotations

from typing import Any

from mllm_missing.scheduler.base import (
    Decision,
    ModuleCatalog,
    ModuleInfo,
    Scheduler,
    ValidationScores,
    get_module_catalog,
    load_validation_scores,
    status_text,
)
from mllm_missing.scheduler.config import PROMPT_CHOICES, SCHEDULER_KINDS, Option, SchedulerConfig
from mllm_missing.scheduler.fixed import FixedScheduler
from mllm_missing.scheduler.llm import LLMScheduler, build_prompt, load_scheduler_llm
from mllm_missing.scheduler.rule import RuleScheduler

__all__ = [
    "PROMPT_CHOICES",
    "SCHEDULER_KINDS",
    "Decision",
    "FixedScheduler",
    "LLMScheduler",
    "ModuleCatalog",
    "ModuleInfo",
    "Option",
    "RuleScheduler",
    "Scheduler",
    "SchedulerConfig",
    "ValidationScores",
    "build_prompt",
    "build_scheduler",
    "get_module_catalog",
    "load_scheduler_llm",
    "load_validation_scores",
    "status_text",
]


def build_scheduler(
    config: SchedulerConfig, *, scores: ValidationScores | None = None, llm: Any = None
) -> Scheduler:
    """The scheduler of `config.kind`, over the registries' modules and `scores`.

    Args:
        config: the settings.
        scores: validation scores per option and pattern (``rule`` needs them; ``llm`` shows
            them to its LLM).
        llm: an already loaded LLM for the ``llm`` kind (default: loaded from `config.llm`).
    """
    catalog = get_module_catalog(scores)
    if config.kind == "llm":
        return LLMScheduler(config, catalog, llm=llm)
    if config.kind == "rule":
        return RuleScheduler(config, catalog)
    return FixedScheduler(config, catalog)
