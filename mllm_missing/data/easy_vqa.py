"""easy-VQA from the `easy-vqa` PyPI package: a 64x64 image + a question -> one of 13 answers.

The answer needs both inputs (the question says what to look for, the image holds it), which
makes it a real missing-modality task that runs offline: 38,575 train and 9,673 test questions
over 4,000 and 1,000 images.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mllm_missing.data.base import (
    SkipReport,
    TaskInfo,
    TaskType,
    cached_dataset,
    check_image,
    fingerprint,
    finish_dataset,
    make_dataset,
)
from mllm_missing.errors import ConfigError, DataFormatError, MissingDependencyError
from mllm_missing.types import Modality

if TYPE_CHECKING:
    import datasets

__all__ = ["SPLITS", "TASK", "load_easy_vqa"]

SPLITS = ("train", "test")

#: Answer names in the order of the package's answers.txt (the label index order).
ANSWERS = (
    "circle",
    "green",
    "red",
    "gray",
    "yes",
    "teal",
    "black",
    "rectangle",
    "yellow",
    "triangle",
    "brown",
    "blue",
    "no",
)

TASK = TaskInfo(
    name="easy_vqa",
    task_type=TaskType.MULTICLASS,
    label_names=ANSWERS,
    modalities=(Modality.IMAGE, Modality.TEXT),
    metric="accuracy",
)


def _package() -> Any:
    try:
        import easy_vqa
    except ImportError as exc:
        raise MissingDependencyError(
            "the easy-VQA data comes from the easy-vqa package; install it with: "
            "pip install 'mllm-missing[offline]'"
        ) from exc
    return easy_vqa


def load_easy_vqa(
    root: str | Path | None = None,
    split: str = "train",
    *,
    cache_dir: str | Path | None = None,
    limit: int | None = None,
) -> datasets.Dataset:
    """Load one easy-VQA split as a dataset with columns id, image, text, label, image_id.

    Args:
        root: unused (the data ships inside the `easy-vqa` package); accepted so every loader
            has the same call shape.
        split: ``train`` or ``test``.
        cache_dir: cache root for the Arrow files.
        limit: keep only the first `limit` questions (for quick runs).

    Returns:
        A dataset whose ``image`` column decodes lazily to a PIL image, ``text`` is the
        question and ``label`` the answer index into `ANSWERS`.
    """
    del root
    if split not in SPLITS:
        raise ConfigError(f"easy_vqa split must be one of {', '.join(SPLITS)}; got {split!r}")
    if limit is not None and limit <= 0:
        raise ConfigError(f"limit must be a positive integer; got {limit}")
    package = _package()
    answers = tuple(package.get_answers())
    if answers != ANSWERS:
        raise DataFormatError(f"easy-vqa answers.txt lists {answers}; expected {ANSWERS}")
    key = f"easy_vqa-{split}-{fingerprint(getattr(package, '__file__', ''), limit, 2)}"
    dataset = cached_dataset(key, lambda: _build(package, split, limit), cache_dir)
    return finish_dataset(dataset, f"easy_vqa {split}")


def _build(package: Any, split: str, limit: int | None) -> datasets.Dataset:
    import datasets

    if split == "train":
        texts, answers, image_ids = package.get_train_questions()
        paths = package.get_train_image_paths()
    else:
        texts, answers, image_ids = package.get_test_questions()
        paths = package.get_test_image_paths()
    if limit is not None:
        texts, answers, image_ids = texts[:limit], answers[:limit], image_ids[:limit]
    index = {name: i for i, name in enumerate(ANSWERS)}
    for image_id in sorted(set(image_ids)):
        if image_id not in paths:
            raise DataFormatError(f"easy-vqa {split}: image {image_id}.png is missing")
        problem = check_image(Path(paths[image_id]))
        if problem:
            raise DataFormatError(f"{paths[image_id]}: {problem}")
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Value("string"),
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(ANSWERS)),
            "image_id": datasets.Value("int32"),
        }
    )
    return make_dataset(
        {
            "id": [f"{split}-{i}" for i in range(len(texts))],
            "image": [paths[i] for i in image_ids],
            "text": list(texts),
            "label": [index[a] for a in answers],
            "image_id": list(image_ids),
        },
        features,
        SkipReport(),
    )
