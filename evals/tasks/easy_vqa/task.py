"""easy-VQA: accuracy over 13 answers; evaluated on the test split."""

from __future__ import annotations

from evals.tasks.base import DatasetTask
from mllm_missing.data.easy_vqa import SPLITS, TASK, load_easy_vqa


class EasyVQATask(DatasetTask):
    """easy-VQA from the `easy-vqa` package (no root needed)."""

    info = TASK
    splits = SPLITS
    eval_split = "test"
    loader = staticmethod(load_easy_vqa)
