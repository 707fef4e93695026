"""Hateful Memes loader: meme image + overlaid text, binary hateful label, official release."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

from mllm_missing.data.base import (
    OnError,
    SkipReport,
    TaskInfo,
    TaskType,
    cached_dataset,
    check_image,
    files_fingerprint,
    fingerprint,
    finish_dataset,
    iter_jsonl,
    labelled_all_or_none,
    make_dataset,
    parse_on_error,
    require_dir,
    require_file,
)
from mllm_missing.errors import ConfigError, DataFormatError
from mllm_missing.types import Modality

TASK = TaskInfo(
    name="hateful_memes",
    task_type=TaskType.BINARY,
    label_names=("hateful",),
    modalities=(Modality.IMAGE, Modality.TEXT),
    metric="auroc",
)

#: The split names; each is read from ``root/<split>.jsonl``.
SPLITS: tuple[str, ...] = ("train", "dev_seen", "dev_unseen", "test_seen", "test_unseen")

_FORMAT_VERSION = 1  # bump when the built columns change, so old cache entries are not reused


def load_hateful_memes(
    root: str | Path,
    split: str,
    *,
    on_error: str | OnError = "stop",
    cache_dir: str | Path | None = None,
) -> datasets.Dataset:
    """Load one split of Hateful Memes from the official release.

    The release holds ``root/<split>.jsonl`` for the five splits and the images under
    ``root/img/``. Each line looks like ``{"id": 42953, "img": "img/42953.png", "label": 0,
    "text": "..."}`` with ``img`` relative to `root`. The full release has 8,500 / 500 / 540 /
    1,000 / 2,000 memes in train / dev_seen / dev_unseen / test_seen / test_unseen.

    Columns: ``id`` (str), ``image`` (decoded lazily), ``text`` and ``label`` (0 or 1, 1 =
    hateful). A split where no line has a label (test_unseen in the official release) has no
    ``label`` column: it serves prediction and is refused for scoring by
    `mllm_missing.data.base.require_labels`. A file where only some lines have a label is an
    error. A line with bad JSON, a missing or unreadable image, an empty text or a label other
    than 0/1 is a bad record.

    Args:
        root: folder of the release (the one holding ``train.jsonl`` and ``img/``).
        split: one of `SPLITS`. The phase-1 names ``dev``/``test`` are refused rather than
            guessed, so seen and unseen splits are never mixed up.
        on_error: ``"stop"`` raises `DataFormatError` on the first bad record; ``"skip"`` skips
            bad records and logs how many.
        cache_dir: cache root (see `mllm_missing.data.base.cache_root`).

    Returns:
        The split as a `datasets.Dataset`.

    Raises:
        ConfigError: an unknown split or error policy.
        DataFormatError: a missing or malformed file (the message names it).
    """
    if split not in SPLITS:
        raise ConfigError(
            f"split must be one of {', '.join(SPLITS)}; got {split!r} (Hateful Memes has "
            "separate seen and unseen dev/test splits: name the one you mean)"
        )
    policy = parse_on_error(on_error)
    root = Path(root).expanduser().resolve()
    require_dir(root, "Hateful Memes folder")
    split_file = require_file(root / f"{split}.jsonl", f"Hateful Memes {split} file")
    # The img/ folder's stat changes when images are added or removed, e.g. after a skipped run.
    watched = [split_file, *([root / "img"] if (root / "img").is_dir() else [])]
    options = fingerprint(_FORMAT_VERSION, str(root), policy.value)
    key = f"hateful_memes-{split}-{options}-{files_fingerprint(watched)}"
    dataset = cached_dataset(key, lambda: _build(root, split_file, SkipReport(policy)), cache_dir)
    return finish_dataset(dataset, f"hateful_memes {split}")


def prepare_hateful_memes(
    root: str | Path,
    *,
    on_error: str | OnError = "stop",
    cache_dir: str | Path | None = None,
) -> dict[str, datasets.Dataset]:
    """Build (and cache) all five splits; see `load_hateful_memes` for the arguments."""
    return {
        split: load_hateful_memes(root, split, on_error=on_error, cache_dir=cache_dir)
        for split in SPLITS
    }


def _build(root: Path, split_file: Path, report: SkipReport) -> datasets.Dataset:
    """Read and check every line of a split file (the slow part, cached by the loader)."""
    rows: list[tuple[str, dict[str, Any]]] = []
    for number, record in iter_jsonl(split_file, report):
        where = f"{split_file}:{number}"
        row = _parse_line(root, record, where, report)
        if row is not None:
            rows.append((where, row))
    if not rows and not report.skipped:
        raise DataFormatError(f"{split_file}: no records")
    has_labels = labelled_all_or_none([(where, row["label"] is not None) for where, row in rows])
    names = ["id", "image", "text", *(["label"] if has_labels else [])]
    columns = {name: [row[name] for _, row in rows] for name in names}
    features = {
        "id": datasets.Value("string"),
        "image": datasets.Value("string"),  # a path; `finish_dataset` makes it a lazy Image
        "text": datasets.Value("string"),
        "label": datasets.Value("int64"),
    }
    return make_dataset(columns, datasets.Features({n: features[n] for n in names}), report)


def _parse_line(
    root: Path, record: dict[str, Any], where: str, report: SkipReport
) -> dict[str, Any] | None:
    """One checked row (label None when the line has none), or None for a bad record."""
    for field in ("id", "img", "text"):
        if field not in record:
            report.fail(where, f"missing field {field!r}")
            return None
    sample_id, img, text = record["id"], record["img"], record["text"]
    if isinstance(sample_id, bool) or not isinstance(sample_id, (int, str)) or sample_id == "":
        report.fail(where, f"bad id {sample_id!r}")
        return None
    if not isinstance(text, str) or not text.strip():
        report.fail(where, "empty text")
        return None
    if not isinstance(img, str) or not img:
        report.fail(where, f"bad img path {img!r}")
        return None
    image_file = root / img
    problem = check_image(image_file)
    if problem is not None:
        report.fail(where, f"{image_file}: {problem}")
        return None
    label = record.get("label")
    if label is not None and (type(label) is not int or label not in (0, 1)):
        report.fail(where, f"label must be 0 or 1; got {label!r}")
        return None
    return {"id": str(sample_id), "image": str(image_file), "text": text, "label": label}
