"""Shared pieces of the dataset loaders: task descriptions, error policy, file checks, caching.

Every loader returns a Hugging Face `datasets.Dataset` with the columns ``id`` (str), one column
per modality it has (``image`` as a lazily decoded `datasets.Image`, ``text`` as str, ``audio``
as a file path) and ``label`` when the split carries labels. A split without labels has no
``label`` column at all, so it can feed prediction but is refused for scoring
(`require_labels`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mllm_missing.errors import ConfigError, DataFormatError
from mllm_missing.types import Modality

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)


class TaskType(str, Enum):
    """What a dataset's label is."""

    MULTILABEL = "multilabel"
    BINARY = "binary"
    MULTICLASS = "multiclass"


@dataclass(frozen=True)
class TaskInfo:
    """What a dataset predicts and from which modalities.

    Attributes:
        name: dataset name used in cache paths and mask tables (e.g. ``"mmimdb"``).
        task_type: the kind of label.
        label_names: class names in label order (one name for binary tasks).
        modalities: the modalities a complete sample has.
        metric: the headline metric of the task.
    """

    name: str
    task_type: TaskType
    label_names: tuple[str, ...]
    modalities: tuple[Modality, ...]
    metric: str

    @property
    def num_labels(self) -> int:
        """Number of output units a head needs."""
        return 1 if self.task_type is TaskType.BINARY else len(self.label_names)


class OnError(str, Enum):
    """What a loader does with a bad record: stop with an error, or skip it and report."""

    STOP = "stop"
    SKIP = "skip"

    @classmethod
    def parse(cls, value: str | OnError) -> OnError:
        """Parse `value`, naming the allowed values when it is wrong."""
        try:
            return cls(value)
        except ValueError:
            raise DataFormatError(
                f"on_error must be one of {', '.join(e.value for e in cls)}; got {value!r}"
            ) from None


@dataclass
class SkipReport:
    """Collects the records a loader skipped, with the file and reason for each."""

    policy: OnError = OnError.STOP
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def fail(self, where: str | Path, reason: str) -> None:
        """Raise `DataFormatError` (policy stop) or record the bad record (policy skip)."""
        if self.policy is OnError.STOP:
            raise DataFormatError(f"{where}: {reason} (use on_error='skip' to skip such records)")
        logger.warning("skipping %s: %s", where, reason)
        self.skipped.append((str(where), reason))

    def summary(self, what: str) -> str:
        """A one-line summary, e.g. ``"mmimdb train: 3 samples skipped"``."""
        return f"{what}: {len(self.skipped)} sample(s) skipped"


def require_file(path: Path, what: str) -> Path:
    """Return `path` if it is a file, else raise `DataFormatError` naming it and `what` it is."""
    if not path.is_file():
        raise DataFormatError(f"{what} not found: {path}")
    return path


def require_dir(path: Path, what: str) -> Path:
    """Return `path` if it is a directory, else raise `DataFormatError` naming it."""
    if not path.is_dir():
        raise DataFormatError(f"{what} not found: {path}")
    return path


def check_image(path: Path) -> str | None:
    """Return None when `path` is a readable image, else the reason it is not."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return "image file not found"
    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"unreadable image ({exc.__class__.__name__}: {exc})"
    return None


def read_json(path: Path) -> Any:
    """Load a JSON file, raising `DataFormatError` with the file name on bad JSON."""
    require_file(path, "JSON file")
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{path}: bad JSON at line {exc.lineno}: {exc.msg}") from exc
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{path}: not UTF-8 text ({exc})") from exc


def iter_jsonl(path: Path, report: SkipReport) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, record) from a JSONL file; bad lines go through `report`."""
    require_file(path, "JSONL file")
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                report.fail(f"{path}:{number}", f"bad JSON line ({exc.msg})")
                continue
            if not isinstance(record, dict):
                report.fail(f"{path}:{number}", "a JSON object was expected")
                continue
            yield number, record


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: `cache_dir`, else $MLLM_MISSING_CACHE, else ~/.cache/mllm_missing."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("MLLM_MISSING_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mllm_missing"


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts, used to name cache entries."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def files_fingerprint(paths: list[Path]) -> str:
    """Hash of the names, sizes and modification times of `paths` (detects a changed release)."""
    stats = []
    for path in paths:
        stat = path.stat()
        stats.append((str(path), stat.st_size, stat.st_mtime_ns))
    return fingerprint(stats)


def cached_dataset(
    key: str, build: Callable[[], datasets.Dataset], cache_dir: str | Path | None = None
) -> datasets.Dataset:
    """Load the Arrow dataset cached under `key`, or build it, save it atomically and load it.

    Args:
        key: cache entry name (include a fingerprint of everything the result depends on).
        build: makes the dataset when there is no cache entry.
        cache_dir: the cache root (see `cache_root`).
    """
    import datasets

    target = cache_root(cache_dir) / "datasets" / key
    if (target / "dataset_info.json").is_file():
        return datasets.load_from_disk(str(target))
    dataset = build()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    dataset.save_to_disk(str(partial))
    try:
        os.replace(partial, target)
    except OSError:  # another process finished first: keep its copy
        import shutil

        shutil.rmtree(partial, ignore_errors=True)
    return datasets.load_from_disk(str(target))


def require_labels(dataset: datasets.Dataset, what: str) -> None:
    """Raise when `dataset` has no labels, saying it can be used for prediction only."""
    if "label" not in dataset.column_names:
        raise DataFormatError(
            f"{what} has no labels: it can be used for prediction, not for scoring"
        )


def choose(name: str, value: Any, allowed: Sequence[str]) -> str:
    """Return `value` as a str if it is one of `allowed`, else raise `ConfigError` listing them."""
    if isinstance(value, Enum):
        value = value.value
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def parse_on_error(value: str | OnError) -> OnError:
    """Parse a loader's `on_error` option, raising `ConfigError` (not a data error) when wrong."""
    return OnError(choose("on_error", value, [e.value for e in OnError]))


def make_dataset(
    columns: dict[str, list[Any]],
    features: datasets.Features,
    report: SkipReport,
    meta: dict[str, Any] | None = None,
) -> datasets.Dataset:
    """Build a dataset whose info keeps the skipped records (and `meta`) through the cache.

    Image columns should be declared as ``Value("string")`` paths here and turned into lazily
    decoded images by `finish_dataset` after caching, so the cache stores paths, not image bytes
    (``save_to_disk`` would embed every image file otherwise).
    """
    import datasets

    payload = {**(meta or {}), "skipped": [list(item) for item in report.skipped]}
    info = datasets.DatasetInfo(description=json.dumps(payload), features=features)
    return datasets.Dataset.from_dict(columns, features=features, info=info)


def dataset_meta(dataset: datasets.Dataset) -> dict[str, Any]:
    """The metadata `make_dataset` stored in `dataset` (empty when there is none)."""
    try:
        meta = json.loads(dataset.info.description or "{}")
    except json.JSONDecodeError:
        return {}
    return meta if isinstance(meta, dict) else {}


def skipped_records(dataset: datasets.Dataset) -> list[tuple[str, str]]:
    """The (where, reason) of every record skipped when `dataset` was built."""
    return [(str(where), str(reason)) for where, reason in dataset_meta(dataset).get("skipped", [])]


def finish_dataset(
    dataset: datasets.Dataset, what: str, image_columns: Sequence[str] = ("image",)
) -> datasets.Dataset:
    """Cast image path columns to lazily decoded `datasets.Image` and log skipped records, if any.

    Args:
        dataset: a dataset from `cached_dataset` built with `make_dataset`.
        what: the name used in the log line, e.g. ``"mmimdb train"``.
        image_columns: columns holding image file paths (missing ones are ignored).
    """
    import datasets

    for column in image_columns:
        if column in dataset.column_names:
            dataset = dataset.cast_column(column, datasets.Image())
    skipped = skipped_records(dataset)
    if skipped:
        logger.warning("%s: %d sample(s) skipped (first: %s: %s)", what, len(skipped), *skipped[0])
    return dataset


def labelled_all_or_none(records: Sequence[tuple[str, bool]]) -> bool:
    """Whether every record has a label; raise when only some do.

    Args:
        records: (where, has a label) per record, in file order; ``where`` names the file and line.

    Raises:
        DataFormatError: naming the first record whose label presence differs from the first's.
    """
    first = bool(records) and records[0][1]
    for where, has_label in records:
        if has_label != first:
            detail = "has no label, but earlier" if first else "has a label, but no earlier"
            raise DataFormatError(f"{where}: {detail} record does; label every record or none")
    return first
