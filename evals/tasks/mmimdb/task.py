"""MM-IMDb: 23-genre multi-label F1 (macro headline); evaluated on the test split."""

from __future__ import annotations

from evals.tasks.base import DatasetTask
from mllm_missing.data.mmimdb import SPLITS, TASK, load_mmimdb


class MMIMDbTask(DatasetTask):
    """MM-IMDb from the official raw release; pass ``text_mode="plot"`` for MAP/DCP counting."""

    info = TASK
    splits = SPLITS
    eval_split = "test"
    loader = staticmethod(load_mmimdb)
