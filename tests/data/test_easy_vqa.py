"""Tests of the easy-VQA loader (real data from the easy-vqa package)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from mllm_missing.data import DATASETS
from mllm_missing.data.easy_vqa import ANSWERS, TASK, load_easy_vqa
from mllm_missing.errors import ConfigError

pytestmark = pytest.mark.slow


def test_full_splits_have_the_published_counts(tmp_path: Path) -> None:
    train = load_easy_vqa(split="train", cache_dir=tmp_path)
    test = load_easy_vqa(split="test", cache_dir=tmp_path)
    assert (len(train), len(test)) == (38575, 9673)
    assert len(set(train["image_id"])) == 4000 and len(set(test["image_id"])) == 1000
    assert train.features["label"].names == list(ANSWERS) and TASK.num_labels == 13


def test_rows_are_lazy_images_questions_and_answers(tmp_path: Path) -> None:
    data = DATASETS.get("easy_vqa")(split="test", cache_dir=tmp_path, limit=20)
    assert len(data) == 20
    row = data[0]
    assert row["text"] == "what is the red shape?"
    assert ANSWERS[row["label"]] == "triangle" and row["image_id"] == 0
    assert isinstance(row["image"], Image.Image) and row["image"].size == (64, 64)
    # Stored as a path to the package's file, decoded only when read.
    raw = data.with_format("arrow")[:1]["image"].to_pylist()[0]
    assert raw["bytes"] is None and raw["path"].endswith("0.png")


def test_bad_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="split must be one of train, test"):
        load_easy_vqa(split="val", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="limit"):
        load_easy_vqa(split="test", cache_dir=tmp_path, limit=0)
