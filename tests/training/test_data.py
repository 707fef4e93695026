"""Training splits: row groups, and which rows leave their own group out of retrieval."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import torch

from mllm_missing.training.data import SplitData, retrieval_context, row_groups
from mllm_missing.types import Modality


def test_rows_group_by_image_id_where_the_dataset_has_one() -> None:
    with_images = datasets.Dataset.from_dict({"id": ["a", "b", "c"], "image_id": [7, 7, 2]})
    assert row_groups(with_images, ["a", "b", "c"]) == ["7", "7", "2"]
    plain = datasets.Dataset.from_dict({"id": ["a", "b"]})
    assert row_groups(plain, ["a", "b"]) == ["a", "b"]


class RecordingStrategy:
    """Records what the training data hands a retrieving strategy."""

    retrieves = True

    def __init__(self) -> None:
        self.excluded: list[Sequence[str | None] | None] = []

    def retrieval_context(
        self, embeddings: Any, presence: torch.Tensor, exclude_groups: Any = None
    ) -> torch.Tensor:
        self.excluded.append(exclude_groups)
        return torch.zeros(len(presence), 1)


class Model:
    def __init__(self) -> None:
        self.strategy = RecordingStrategy()


def split(name: str) -> SplitData:
    presence = torch.tensor([[True, True, False]] * 3)
    frozen = {Modality.IMAGE: torch.ones(3, 2), Modality.TEXT: torch.ones(3, 2)}
    return SplitData(
        name, None, ["r0", "r1", "r2"], torch.zeros(3), presence, {}, frozen=frozen,
        groups=["img5", "img5", "img9"],
    )  # fmt: skip


def test_train_and_validation_rows_leave_their_group_out_test_rows_do_not() -> None:
    model = Model()
    for name in ("train", "val", "test"):
        retrieval_context(model, split(name), torch.tensor([2, 0]))  # type: ignore[arg-type]
    assert model.strategy.excluded == [["img9", "img5"], ["img9", "img5"], None]


def test_training_and_validation_knn_stand_ins_leave_the_rows_group_out() -> None:
    """The loss and validation predictions hand a knn imputation each row's group; test
    predictions do not. Rows 0 and 1 share an image, so leaving the group out changes row 0."""
    import pytest

    pytest.importorskip("open_clip")
    from mllm_missing.data.base import TaskInfo, TaskType
    from mllm_missing.strategies.testing import tiny_classifier
    from mllm_missing.training.supervised import SupervisedTask, predict

    model = tiny_classifier(imputation="knn")
    generator = torch.Generator().manual_seed(0)
    features = {m: torch.randn(6, 32, generator=generator) for m in (Modality.IMAGE, Modality.TEXT)}
    features[Modality.IMAGE][1] = features[Modality.IMAGE][0]
    presence = torch.ones(6, 3, dtype=torch.bool)
    presence[0, 1] = presence[3, 0] = False
    presence[:, 2] = False
    groups = ["img0", "img0", "img1", "img2", "img3", "img4"]
    model.classifier.imputation.fit(features, presence, groups=groups)

    def data(name: str) -> SplitData:
        zeroed = {m: x * presence[:, i : i + 1] for i, (m, x) in enumerate(features.items())}
        ids = [f"r{i}" for i in range(6)]
        return SplitData(name, None, ids, torch.tensor([0, 1, 2, 0, 1, 2]), presence, {},
                         features=zeroed, groups=groups)  # fmt: skip

    zeroed = data("test").features
    with torch.no_grad():
        own = model(zeroed, presence, groups)
        plain = model(zeroed, presence)
    assert not torch.allclose(own[0], plain[0])
    torch.testing.assert_close(predict(model, data("val")), own)
    torch.testing.assert_close(predict(model, data("test")), plain)
    info = TaskInfo("shapes", TaskType.MULTICLASS, ("a", "b", "c"), (Modality.IMAGE, Modality.TEXT),
                    "accuracy")  # fmt: skip
    task = SupervisedTask(model, info, data("train"), data("val"))
    rows = torch.tensor([0, 3])
    model.train()
    torch.manual_seed(1)  # the same dropout in both
    subset = {m: x[rows] for m, x in zeroed.items()}
    logits = model(subset, presence[rows], ["img0", "img2"])
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 0]))
    torch.manual_seed(1)
    torch.testing.assert_close(task.loss(rows), expected)
