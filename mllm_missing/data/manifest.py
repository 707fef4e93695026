"""Generic manifest loader: a user's own JSONL or CSV file of image/text/audio rows and labels."""

from __future__ import annotations

import csv
from collections.abc import Sequence
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
    choose,
    dataset_meta,
    files_fingerprint,
    fingerprint,
    finish_dataset,
    iter_jsonl,
    labelled_all_or_none,
    make_dataset,
    parse_on_error,
    require_file,
)
from mllm_missing.errors import ConfigError, DataFormatError
from mllm_missing.types import MODALITY_ORDER, Modality

#: Manifest file types.
FORMATS: tuple[str, ...] = (".jsonl", ".csv")
#: The headline metric `manifest_task` gives each task type.
DEFAULT_METRICS: dict[TaskType, str] = {
    TaskType.MULTICLASS: "accuracy",
    TaskType.BINARY: "auroc",
    TaskType.MULTILABEL: "f1_macro",
}

_FORMAT_VERSION = 1  # bump when the built columns change, so old cache entries are not reused
_Row = tuple[str, dict[str, Any]]  # ("file:line", cells)


def load_manifest(
    path: str | Path,
    split: str | None = None,
    *,
    label_column: str = "label",
    task_type: str | TaskType = "multiclass",
    label_names: Sequence[str] | None = None,
    base_dir: str | Path | None = None,
    on_error: str | OnError = "stop",
    cache_dir: str | Path | None = None,
) -> datasets.Dataset:
    """Load a manifest: one sample per row of a ``.jsonl`` or ``.csv`` file.

    Columns read: ``image`` and ``audio`` (file paths, relative to the manifest's folder unless
    absolute or `base_dir` is given), ``text``, ``id`` (else the row's line number in the file is
    the id) and `label_column`; at least one of image/text/audio must exist. An empty or missing
    cell means that modality is absent for the row, and the dataset says so explicitly: every
    modality column of the file is kept (``""`` for absent text, None for an absent image or
    audio path) next to a bool column ``has_image`` / ``has_text`` / ``has_audio``. A row with
    every modality absent, an unreadable image, a missing audio file or a bad label is a bad
    record.

    Labels: ``"multiclass"`` stores the index into the label names (a `datasets.ClassLabel`);
    ``"binary"`` stores 0/1 (``0``, ``1``, ``true``, ``false``); ``"multilabel"`` takes a list
    (JSONL) or an ``"a|b"`` string and stores a multi-hot list. Label names are `label_names`,
    else the values found, sorted (numerically when all are integers). A file with no label
    values has no ``label`` column (prediction only); one where only some rows have a label is
    an error. Use `manifest_task` for the dataset's `TaskInfo`.

    Args:
        path: the manifest file, or a folder holding ``<split>.jsonl`` or ``<split>.csv``.
        split: with a folder, the file to read; with a file, keep the rows whose ``split``
            column equals it (None keeps every row).
        label_column: name of the label column.
        task_type: ``"multiclass"``, ``"binary"`` or ``"multilabel"``.
        label_names: the class names in label order (one name for a binary task).
        base_dir: folder that relative media paths start from.
        on_error: ``"stop"`` raises `DataFormatError` on the first bad record; ``"skip"`` skips
            bad records and logs how many.
        cache_dir: cache root (see `mllm_missing.data.base.cache_root`).

    Returns:
        The manifest as a `datasets.Dataset`.

    Raises:
        ConfigError: a bad option (the message names it and its allowed values).
        DataFormatError: a missing or malformed file (the message names it, and the line).
    """
    task = TaskType(choose("task_type", task_type, [t.value for t in TaskType]))
    policy = parse_on_error(on_error)
    names = _check_label_names(label_names, task)
    path = Path(path).expanduser().resolve()
    file, keep_split = _manifest_file(path, split)
    base = Path(base_dir).expanduser().resolve() if base_dir is not None else file.parent
    options = [_FORMAT_VERSION, str(file), keep_split, label_column, task.value, names, str(base)]
    key = f"manifest-{fingerprint(*options, policy.value)}-{files_fingerprint([file])}"

    def build() -> datasets.Dataset:
        report = SkipReport(policy)
        table = _read_rows(file, keep_split, report)
        return _build(file, table, base, label_column, task, names, report)

    return finish_dataset(cached_dataset(key, build, cache_dir), f"manifest {file}")


def manifest_task(dataset: datasets.Dataset, name: str = "manifest") -> TaskInfo:
    """The `TaskInfo` of a dataset from `load_manifest` (label names, modalities, metric).

    Args:
        dataset: a dataset returned by `load_manifest` (the task is stored in its info).
        name: the task name to use in cache paths and mask tables.
    """
    task = dataset_meta(dataset).get("task")
    if not isinstance(task, dict):
        raise DataFormatError("this dataset was not built by load_manifest: it has no task info")
    task_type = TaskType(task["task_type"])
    return TaskInfo(
        name=name,
        task_type=task_type,
        label_names=tuple(task["label_names"]),
        modalities=tuple(Modality(m) for m in task["modalities"]),
        metric=DEFAULT_METRICS[task_type],
    )


def _check_label_names(names: Sequence[str] | None, task: TaskType) -> list[str] | None:
    if names is None:
        return None
    size = 1 if task is TaskType.BINARY else len(names)
    bad = isinstance(names, str) or not all(isinstance(n, str) and n for n in names)
    if bad or not names or len(set(names)) != len(names) or len(names) != size:
        one = "one name" if task is TaskType.BINARY else "unique non-empty strings"
        raise ConfigError(f"label_names of a {task.value} task must be {one}; got {names!r}")
    return list(names)


def _manifest_file(path: Path, split: str | None) -> tuple[Path, str | None]:
    """The file to read and the value of its ``split`` column to keep (None: every row)."""
    if path.is_dir():
        if split is None:
            raise ConfigError(f"split is required when the manifest path is a folder ({path})")
        found = [path / f"{split}{ext}" for ext in FORMATS if (path / f"{split}{ext}").is_file()]
        if len(found) != 1:
            names = " or ".join(f"{split}{ext}" for ext in FORMATS)
            state = "both" if found else "neither"
            raise DataFormatError(f"{path}: expected one of {names}, found {state}")
        return found[0], None
    require_file(path, "manifest file")
    if path.suffix.lower() not in FORMATS:
        raise DataFormatError(f"{path}: a manifest must be a {' or '.join(FORMATS)} file")
    return path, split


def _read_rows(
    file: Path, keep_split: str | None, report: SkipReport
) -> tuple[list[str], list[_Row]]:
    """The column names and the rows of `file` (bad JSON lines go through `report`)."""
    rows: list[_Row] = []
    if file.suffix.lower() == ".jsonl":
        for number, record in iter_jsonl(file, report):
            rows.append((f"{file}:{number}", record))
        columns = list(dict.fromkeys(key for _, record in rows for key in record))
    else:
        try:
            with file.open(encoding="utf-8-sig", newline="") as handle:
                reader = csv.DictReader(handle)
                columns = [c for c in reader.fieldnames or [] if c]
                start = reader.line_num + 1
                for cells in reader:
                    if None in cells:
                        report.fail(f"{file}:{start}", "more cells than header columns")
                    else:
                        rows.append((f"{file}:{start}", cells))
                    start = reader.line_num + 1
        except (UnicodeDecodeError, csv.Error) as exc:
            raise DataFormatError(f"{file}: unreadable CSV ({exc})") from exc
    if keep_split is not None:
        if "split" not in columns:
            raise DataFormatError(f"{file}: no 'split' column to select split {keep_split!r} from")
        found = sorted({str(cells.get("split")) for _, cells in rows})
        rows = [row for row in rows if str(row[1].get("split")) == keep_split]
        if not rows:
            raise DataFormatError(f"{file}: no row of split {keep_split!r} (splits: {found})")
    return columns, rows


def _cell(cells: dict[str, Any], column: str) -> Any:
    """The value of a cell, None when it is missing or blank."""
    value = cells.get(column)
    return None if value is None or (isinstance(value, str) and not value.strip()) else value


def _build(
    file: Path,
    table: tuple[list[str], list[_Row]],
    base: Path,
    label_column: str,
    task: TaskType,
    label_names: list[str] | None,
    report: SkipReport,
) -> datasets.Dataset:
    """Check every row and assemble the columns (the slow part, cached by `load_manifest`)."""
    columns, rows = table
    modalities = [m for m in MODALITY_ORDER if m.value in columns]
    if not modalities:
        raise DataFormatError(
            f"{file}: needs at least one of the columns image, text, audio; found {columns}"
        )
    samples: list[tuple[str, dict[str, Any], Any]] = []
    for where, cells in rows:
        sample = _parse_row(where, cells, modalities, base, "id" in columns, report)
        if sample is not None:
            samples.append((where, sample, _cell(cells, label_column)))
    has_labels = labelled_all_or_none([(where, raw is not None) for where, _, raw in samples])
    if has_labels:
        samples, label_names = _encode_labels(samples, task, label_names, report)
    if task is TaskType.BINARY:
        label_names = label_names or [label_column]
    features: dict[str, Any] = {"id": datasets.Value("string")}
    for modality in modalities:
        features[modality.value] = datasets.Value("string")  # image: made lazy by finish_dataset
        features[f"has_{modality.value}"] = datasets.Value("bool")
    if has_labels:
        features["label"] = _label_feature(task, label_names or [])
    data = {name: [sample[name] for _, sample, _ in samples] for name in features}
    kinds = [m.value for m in modalities]
    task_meta = {"task_type": task.value, "label_names": label_names or [], "modalities": kinds}
    return make_dataset(data, datasets.Features(features), report, {"task": task_meta})


def _parse_row(
    where: str,
    cells: dict[str, Any],
    modalities: list[Modality],
    base: Path,
    has_id: bool,
    report: SkipReport,
) -> dict[str, Any] | None:
    """The id and modality cells of one row, checked; None for a bad record."""
    raw_id = _cell(cells, "id") if has_id else where.rsplit(":", 1)[1]
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        report.fail(where, f"bad or empty id {cells.get('id')!r}")
        return None
    sample: dict[str, Any] = {"id": str(raw_id).strip()}
    for modality in modalities:
        value = _cell(cells, modality.value)
        if value is not None and not isinstance(value, str):
            report.fail(where, f"{modality.value} must be a string; got {value!r}")
            return None
        if value is not None and modality is not Modality.TEXT:
            media = Path(value.strip()).expanduser()
            media = media if media.is_absolute() else base / media
            if modality is Modality.IMAGE:
                problem = check_image(media)
            else:
                problem = None if media.is_file() else "audio file not found"
            if problem is not None:
                report.fail(where, f"{media}: {problem}")
                return None
            value = str(media)
        absent = "" if modality is Modality.TEXT else None
        sample[modality.value] = absent if value is None else value
        sample[f"has_{modality.value}"] = value is not None
    if not any(sample[f"has_{m.value}"] for m in modalities):
        report.fail(where, "every modality is missing (empty cells)")
        return None
    return sample


_BINARY = {"0": 0, "1": 1, "false": 0, "true": 1}


def _names_in(raw: Any, task: TaskType) -> list[str] | None:
    """The label names a label cell holds, or None when it is malformed for `task`."""
    if isinstance(raw, bool):
        return [str(int(raw))] if task is TaskType.BINARY else None
    if task is TaskType.MULTILABEL:
        items = raw.split("|") if isinstance(raw, str) else raw
        if not isinstance(items, list) or not all(
            isinstance(i, (str, int)) and not isinstance(i, bool) for i in items
        ):
            return None
        return list(dict.fromkeys(s for s in (str(i).strip() for i in items) if s))
    if not isinstance(raw, (str, int)):
        return None
    name = str(raw).strip()
    if task is TaskType.BINARY:
        return [name.lower()] if name.lower() in _BINARY else None
    return [name]


def _encode_labels(
    samples: list[tuple[str, dict[str, Any], Any]],
    task: TaskType,
    label_names: list[str] | None,
    report: SkipReport,
) -> tuple[list[tuple[str, dict[str, Any], Any]], list[str] | None]:
    """Store each sample's encoded ``label``; returns the kept samples and the label names."""
    parsed = []
    for where, sample, raw in samples:
        names = _names_in(raw, task)
        if names is None:
            report.fail(where, f"bad {task.value} label {raw!r}")
            continue
        unknown = [n for n in names if label_names is not None and n not in label_names]
        if task is not TaskType.BINARY and unknown:
            report.fail(where, f"label {unknown[0]!r} is not one of {label_names}")
            continue
        parsed.append((where, sample, names))
    if task is not TaskType.BINARY and label_names is None:
        found = {name for _, _, names in parsed for name in names}
        numeric = all(n.lstrip("-").isdigit() for n in found)
        label_names = sorted(found, key=int) if numeric else sorted(found)
    index = {name: i for i, name in enumerate(label_names or [])}
    for _, sample, names in parsed:
        if task is TaskType.BINARY:
            sample["label"] = _BINARY[names[0]]
        elif task is TaskType.MULTICLASS:
            sample["label"] = index[names[0]]
        else:
            sample["label"] = [int(name in names) for name in index]
    return parsed, label_names


def _label_feature(task: TaskType, names: list[str]) -> Any:
    if task is TaskType.BINARY:
        return datasets.Value("int64")
    if task is TaskType.MULTICLASS:
        return datasets.ClassLabel(names=names)
    return datasets.List(datasets.Value("int8"), length=len(names))
