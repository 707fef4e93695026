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
