"""MM-IMDb loader: movie posters and plots, 23-genre multi-label, from the official raw release."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
from tqdm.auto import tqdm

from mllm_missing.data.base import (
    OnError,
    SkipReport,
    TaskInfo,
    TaskType,
    cached_dataset,
    check_image,
    choose,
    files_fingerprint,
    fingerprint,
    finish_dataset,
    make_dataset,
    parse_on_error,
    read_json,
    require_dir,
    require_file,
)
from mllm_missing.errors import DataFormatError
from mllm_missing.types import Modality

#: The 23 genres in label order (the order used by MAP and RAGPT).
GENRES: tuple[str, ...] = (
    "Drama", "Comedy", "Romance", "Thriller", "Crime", "Action", "Adventure", "Horror",
    "Documentary", "Mystery", "Sci-Fi", "Fantasy", "Family", "Biography", "War", "History",
    "Music", "Animation", "Musical", "Western", "Sport", "Short", "Film-Noir",
)  # fmt: skip

TASK = TaskInfo(
    name="mmimdb",
    task_type=TaskType.MULTILABEL,
    label_names=GENRES,
    modalities=(Modality.IMAGE, Modality.TEXT),
    metric="f1_macro",
)

#: The split names of split.json.
SPLITS: tuple[str, ...] = ("train", "dev", "test")
#: Other names accepted for the dev split.
SPLIT_ALIASES: dict[str, str] = {"val": "dev", "validation": "dev"}
#: ``"movie"``: one sample per movie; ``"plot"``: one sample per (movie, plot) pair.
TEXT_MODES: tuple[str, ...] = ("movie", "plot")

_GENRE_INDEX = {genre: i for i, genre in enumerate(GENRES)}
_FORMAT_VERSION = 1  # bump when the built columns change, so old cache entries are not reused
_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "image": datasets.Value("string"),  # a path; `finish_dataset` makes it a lazy Image
        "text": datasets.Value("string"),
        "label": datasets.List(datasets.Value("int8"), length=len(GENRES)),
    }
)


def load_mmimdb(
    root: str | Path,
    split: str,
    *,
    text_mode: str = "movie",
    on_error: str | OnError = "stop",
    cache_dir: str | Path | None = None,
) -> datasets.Dataset:
    """Load one split of MM-IMDb from the official raw release.

    The release holds ``root/split.json`` (``{"train": [ids], "dev": [ids], "test": [ids]}``)
    and, per movie, ``root/dataset/<id>.json`` (the IMDb record; its ``"genres"`` list and its
    ``"plot"`` list are used) and the poster ``root/dataset/<id>.jpeg``. The full release has
    15,552 / 2,608 / 7,799 movies in train / dev / test.

    Columns: ``id`` (the IMDb id, or ``"<id>_<k>"`` for the k-th plot in plot mode), ``image``
    (the poster, decoded lazily), ``text`` and ``label`` (23 ints, multi-hot in `GENRES` order;
    genres outside the 23 are ignored). Blank plots are dropped. A movie with no usable plot, no
    readable poster or none of the 23 genres is a bad record.

    Args:
        root: folder of the release (the one holding ``split.json``).
        split: ``"train"``, ``"dev"`` or ``"test"``; ``"val"`` and ``"validation"`` mean ``"dev"``.
        text_mode: ``"movie"`` (one sample per movie, its plots joined by a blank line; used by
            most papers) or ``"plot"`` (one sample per (movie, plot) pair, as MAP and DCP do).
        on_error: ``"stop"`` raises `DataFormatError` on the first bad record; ``"skip"`` skips
            bad records and logs how many.
        cache_dir: cache root (see `mllm_missing.data.base.cache_root`).

    Returns:
        The split as a `datasets.Dataset`.

    Raises:
        ConfigError: an unknown split, text mode or error policy.
        DataFormatError: a missing or malformed file (the message names it).
    """
    split = SPLIT_ALIASES.get(split, split)
    split = choose("split", split, SPLITS)
    text_mode = choose("text_mode", text_mode, TEXT_MODES)
    policy = parse_on_error(on_error)
    root = Path(root).expanduser().resolve()
    split_file = require_file(root / "split.json", "MM-IMDb split file")
    folder = require_dir(root / "dataset", "MM-IMDb dataset folder")
    ids = _split_ids(split_file, split)
    record_files = [folder / f"{movie}{suffix}" for movie in ids for suffix in (".json", ".jpeg")]
    options = fingerprint(_FORMAT_VERSION, str(root), text_mode, policy.value)
    present = [p for p in record_files if p.exists()]  # adding a missing file changes the key
    key = f"mmimdb-{split}-{options}-{files_fingerprint([split_file, *present])}"
    dataset = cached_dataset(
        key, lambda: _build(folder, ids, split, text_mode, SkipReport(policy)), cache_dir
    )
    return finish_dataset(dataset, f"mmimdb {split}")


def prepare_mmimdb(
    root: str | Path,
    *,
    text_mode: str = "movie",
    on_error: str | OnError = "stop",
    cache_dir: str | Path | None = None,
) -> dict[str, datasets.Dataset]:
    """Build (and cache) every split of MM-IMDb; see `load_mmimdb` for the arguments."""
    return {
        split: load_mmimdb(root, split, text_mode=text_mode, on_error=on_error, cache_dir=cache_dir)
        for split in SPLITS
    }


def _split_ids(split_file: Path, split: str) -> list[str]:
    """The movie ids of `split` in split.json, checked to be a list of strings."""
    splits = read_json(split_file)
    if not isinstance(splits, dict) or split not in splits:
        found = sorted(splits) if isinstance(splits, dict) else type(splits).__name__
        raise DataFormatError(f"{split_file}: no {split!r} list (found {found})")
    ids = splits[split]
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise DataFormatError(f"{split_file}: {split!r} must be a list of movie id strings")
    return ids


def _build(
    folder: Path, ids: list[str], split: str, text_mode: str, report: SkipReport
) -> datasets.Dataset:
    """Read and check every movie of the split (the slow part, cached by `load_mmimdb`)."""
    columns: dict[str, list[Any]] = {"id": [], "image": [], "text": [], "label": []}
    for movie in tqdm(ids, desc=f"mmimdb {split}", unit="movie", disable=None, leave=False):
        record_file = folder / f"{movie}.json"
        image_file = folder / f"{movie}.jpeg"
        if not record_file.is_file():
            report.fail(record_file, f"movie record of {movie!r} not found")
            continue
        try:
            record = read_json(record_file)
        except DataFormatError as exc:
            report.fail(record_file, str(exc).removeprefix(f"{record_file}: "))
            continue
        parsed = _parse_record(record, record_file, report)
        if parsed is None:
            continue
        label, plots = parsed
        problem = check_image(image_file)
        if problem is not None:
            report.fail(image_file, problem)
            continue
        if text_mode == "movie":
            samples = [(movie, "\n\n".join(text for _, text in plots))]
        else:
            samples = [(f"{movie}_{k}", text) for k, text in plots]
        for sample_id, text in samples:
            columns["id"].append(sample_id)
            columns["image"].append(str(image_file))
            columns["text"].append(text)
            columns["label"].append(label)
    return make_dataset(columns, _FEATURES, report)


def _parse_record(
    record: Any, record_file: Path, report: SkipReport
) -> tuple[list[int], list[tuple[int, str]]] | None:
    """The multi-hot label and the (index, plot) pairs of one movie, or None if it is bad."""
    if not isinstance(record, dict):
        report.fail(record_file, "a JSON object was expected")
        return None
    genres, plots = record.get("genres"), record.get("plot")
    if not isinstance(genres, list):
        report.fail(record_file, "missing or non-list 'genres' field")
        return None
    label = [0] * len(GENRES)
    for genre in genres:
        if isinstance(genre, str) and genre.strip() in _GENRE_INDEX:
            label[_GENRE_INDEX[genre.strip()]] = 1
    if not any(label):
        report.fail(record_file, f"none of the 23 genres in {genres!r}")
        return None
    if isinstance(plots, str):  # some re-packagings store a single plot as a string
        plots = [plots]
    if not isinstance(plots, list):
        report.fail(record_file, "missing or non-list 'plot' field")
        return None
    texts = [(k, p.strip()) for k, p in enumerate(plots) if isinstance(p, str) and p.strip()]
    if not texts:
        report.fail(record_file, "empty text: no non-blank plot")
        return None
    return label, texts
