"""Tests of the evaluation task classes on official-format fixtures and real easy-VQA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from evals.tasks import TASKS
from mllm_missing.errors import ConfigError, DataFormatError
from mllm_missing.types import Modality, Presence


def test_registry_lists_the_three_tasks() -> None:
    assert TASKS.names() == ["easy_vqa", "hateful_memes", "mmimdb"]


def test_mmimdb_task_inputs_and_f1(mmimdb_root: Path, cache: Path) -> None:
    task = TASKS.get("mmimdb")(mmimdb_root, cache_dir=cache)
    data = task.load()
    refs = task.references(data)
    assert refs.shape == (len(data), 23)
    sample = task.to_inputs(data[0], Presence.of("text"))
    assert set(sample.payloads) == {Modality.TEXT} and sample.id == data[0]["id"]
    perfect = task.score(refs.astype(float), refs)
    assert perfect["f1_macro"] == pytest.approx(
        np.mean([1.0 if refs[:, c].any() else 0.0 for c in range(23)])
    )
    with pytest.raises(ConfigError, match="mmimdb split must be one of train, dev, test"):
        task.load("validation_set")


def test_hateful_memes_task_scores_seen_and_refuses_unlabelled(
    memes_root: Path, cache: Path
) -> None:
    task = TASKS.get("hateful_memes")(memes_root, cache_dir=cache)
    data = task.load()
    refs = task.references(data)
    scores = task.score(refs.astype(float), refs)
    assert scores["auroc"] == 1.0 and scores["accuracy"] == 1.0
    with pytest.raises(DataFormatError, match="prediction, not for scoring"):
        task.references(task.load("test_unseen"))


@pytest.mark.slow
def test_easy_vqa_task_accuracy() -> None:
    task = TASKS.get("easy_vqa")(limit=50)
    data = task.load()
    refs = task.references(data)
    one_hot = np.eye(13)[refs]
    assert task.score(one_hot, refs) == {"accuracy": 1.0}
    sample = task.to_inputs(data[0], Presence.of("image", "text"))
    assert sample.payloads[Modality.TEXT] == data[0]["text"]
