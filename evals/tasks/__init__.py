"""Evaluation tasks, one folder each, registered by name in `TASKS`."""

from __future__ import annotations

from typing import Any

from mllm_missing.registry import Registry

TASKS: Registry[Any] = Registry("eval task")
TASKS.register_lazy("easy_vqa", "evals.tasks.easy_vqa.task:EasyVQATask")
TASKS.register_lazy("mmimdb", "evals.tasks.mmimdb.task:MMIMDbTask")
TASKS.register_lazy("hateful_memes", "evals.tasks.hateful_memes.task:HatefulMemesTask")

__all__ = ["TASKS"]
