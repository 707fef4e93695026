"""Hateful Memes: AUROC and accuracy; evaluated on test_seen (the labelled test split)."""

from __future__ import annotations

from evals.tasks.base import DatasetTask
from mllm_missing.data.hateful_memes import SPLITS, TASK, load_hateful_memes


class HatefulMemesTask(DatasetTask):
    """Hateful Memes from the official release; test_unseen has no labels and is not scored."""

    info = TASK
    splits = SPLITS
    eval_split = "test_seen"
    loader = staticmethod(load_hateful_memes)
