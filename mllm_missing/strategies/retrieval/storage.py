"""On-disk layout of a memory bank: ``config.json`` plus one ``.npy`` per array, memory-mappable."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mllm_missing.atomic import atomic_directory
from mllm_missing.errors import DataFormatError
from mllm_missing.strategies.retrieval.config import MemoryBankConfig
from mllm_missing.types import Modality

#: Bumped when the layout changes; `read_bank_files` refuses other versions.
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"


def write_bank_files(
    directory: str | Path, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
) -> Path:
    """Write ``config.json`` (`meta` plus the format version) and ``<name>.npy`` per array.

    The files are written into a temporary folder beside `directory` that then replaces it with
    `os.replace`, so a reader never sees a half-written bank. An existing bank at `directory` is
    moved aside first and deleted once the new one is in place.
    """
    directory = Path(directory)
    # Arrays memory-mapped from a replaced bank stay readable: unlinking keeps open mappings.
    with atomic_directory(directory) as partial:
        for name, array in arrays.items():
            np.save(partial / f"{name}.npy", np.asarray(array), allow_pickle=False)
        content = {"format_version": FORMAT_VERSION, **meta}
        (partial / CONFIG_FILE).write_text(json.dumps(content, indent=2) + "\n")
    return directory


def read_bank_meta(directory: str | Path) -> dict[str, Any]:
    """Read ``config.json`` of a bank, checking its format version."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise DataFormatError(f"{path}: missing; not a memory bank folder")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataFormatError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise DataFormatError(f"{path}: expected a JSON object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise DataFormatError(
            f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})"
        )
    for key in ("config", "num_entries", "modalities", "dims"):
        if key not in meta:
            raise DataFormatError(f"{path}: missing key {key!r}")
    return meta


def read_array(
    directory: str | Path,
    name: str,
    *,
    shape: tuple[int, ...],
    dtype: str | None = None,
    kind: str | None = None,
    mmap: bool = False,
) -> np.ndarray:
    """Load ``<name>.npy`` (memory-mapped read-only if `mmap`) and check its shape and dtype.

    Args:
        directory: the bank folder.
        name: the array name (file stem).
        shape: the expected shape.
        dtype: the expected numpy dtype name, if exact.
        kind: the expected numpy dtype kind (``"U"``, ``"b"``...), if only the kind is fixed.
        mmap: memory-map the file instead of reading it.

    Raises:
        DataFormatError: naming the file when it is missing, unreadable or of the wrong shape.
    """
    path = Path(directory) / f"{name}.npy"
    if not path.is_file():
        raise DataFormatError(f"{path}: missing")
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError, OSError or EOFError for a bad file
        raise DataFormatError(f"{path}: not a readable .npy array ({exc})") from exc
    if array.shape != shape:
        raise DataFormatError(f"{path}: shape {array.shape}, expected {shape}")
    if dtype is not None and array.dtype != np.dtype(dtype):
        raise DataFormatError(f"{path}: dtype {array.dtype}, expected {dtype}")
    if kind is not None and array.dtype.kind != kind:
        raise DataFormatError(f"{path}: dtype {array.dtype}, expected kind {kind!r}")
    return array


@dataclass
class BankFiles:
    """The checked contents of a bank folder.

    Attributes:
        config: the bank's config.
        ids: the entry ids.
        presence: bool (N, M), in memory.
        normalised: modality -> unit rows (N, D), memory-mapped if asked.
        norms: modality -> float32 norms (N,), memory-mapped if asked.
        groups: the entries' group names (N,), or None where the bank has none.
        labels: float32 (N, L) stored targets, or None where the bank has none.
    """

    config: MemoryBankConfig
    ids: list[str]
    presence: np.ndarray
    normalised: dict[Modality, np.ndarray]
    norms: dict[Modality, np.ndarray]
    groups: np.ndarray | None = None
    labels: np.ndarray | None = None


def read_bank_files(directory: str | Path, *, mmap: bool) -> BankFiles:
    """Read and check every file of a bank folder written by `write_bank_files`.

    Raises:
        DataFormatError: naming the file that is missing, unreadable or inconsistent with
            ``config.json``.
    """
    meta = read_bank_meta(directory)
    try:
        config = MemoryBankConfig.from_dict(meta["config"])
        rows = int(meta["num_entries"])
        # Banks written before groups and labels existed have neither key.
        has_groups = bool(meta.get("groups", False))
        label_dim = int(meta.get("label_dim", 0))
        modalities = [Modality.parse(m) for m in meta["modalities"]]
        dims = {Modality.parse(m): int(d) for m, d in meta["dims"].items()}
        if set(modalities) != set(dims):
            raise ValueError("modalities and dims disagree")
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        where = Path(directory) / CONFIG_FILE
        raise DataFormatError(f"{where}: inconsistent bank description ({exc!r})") from exc
    ids = read_array(directory, "ids", shape=(rows,), kind="U")
    presence = read_array(directory, "presence", shape=(rows, len(modalities)), dtype="bool")
    normalised, norms = {}, {}
    for m in modalities:
        normalised[m] = read_array(
            directory, m.value, shape=(rows, dims[m]), dtype=config.dtype, mmap=mmap
        )
        norms[m] = read_array(
            directory, f"{m.value}_norms", shape=(rows,), dtype="float32", mmap=mmap
        )
    groups = None
    if has_groups:
        groups = np.array(read_array(directory, "groups", shape=(rows,), kind="U"))
    labels = None
    if label_dim:
        labels = read_array(
            directory, "labels", shape=(rows, label_dim), dtype="float32", mmap=mmap
        )
    return BankFiles(config, ids.tolist(), np.array(presence), normalised, norms, groups, labels)
