"""Missingness as data: `MissingConfig` and the seeded mask tables every method reads.

A mask table says, for every sample id of one dataset split, which modalities are present. Tables
are generated from a seed with exact counts (not coin flips), written once to disk as CSV, and read
back by every method, so all methods see the very same missing samples. The same configuration
always gives a byte-identical file.

Types (rate = η):
- ``text`` / ``image`` / ``audio``: exactly round(η·n) samples lose that modality.
- ``both``: round(η·n) samples lose one modality; a share `both_ratio` of them lose text and the
  rest lose image (η/2 and η/2 with the default 0.5), as in the MAP/DCP/MoRA protocol.
- ``any``: every modality of the dataset is dropped independently with probability η; a sample
  that would lose all of them keeps one (chosen at random) unless `allow_all_missing` is set.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np

from mllm_missing.atomic import atomic_write_text
from mllm_missing.errors import ConfigError, DataFormatError
from mllm_missing.types import MODALITY_ORDER, Modality

__all__ = [
    "MaskTable",
    "MissingConfig",
    "MissingType",
    "get_mask_table",
    "make_mask_table",
    "read_mask_table",
    "write_mask_table",
]


class MissingType(str, Enum):
    """Which modalities a missing-modality setting removes."""

    TEXT = "text"
    IMAGE = "image"
    AUDIO = "audio"
    BOTH = "both"
    ANY = "any"


@dataclass(frozen=True)
class MissingConfig:
    """A missing-modality setting.

    Args:
        type: one of ``text``, ``image``, ``audio``, ``both``, ``any``.
        rate: share of samples (or, for ``any``, probability per modality) that lose a modality,
            in [0, 1].
        both_ratio: for ``both``, the share of missing samples that lose text (the rest lose
            image), in [0, 1].
        seed: seed of the table.
        allow_all_missing: for ``any``, allow samples with every modality missing.
    """

    type: MissingType | str = MissingType.BOTH
    rate: float = 0.7
    both_ratio: float = 0.5
    seed: int = 0
    allow_all_missing: bool = False

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "type", MissingType(self.type))
        except ValueError:
            allowed = ", ".join(t.value for t in MissingType)
            raise ConfigError(f"missing.type must be one of {allowed}; got {self.type!r}") from None
        for name in ("rate", "both_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"missing.{name} must be a number in [0, 1]; got {value!r}")
            if not 0.0 <= float(value) <= 1.0:
                raise ConfigError(f"missing.{name} must be in [0, 1]; got {value}")
            object.__setattr__(self, name, float(value))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"missing.seed must be a non-negative integer; got {self.seed!r}")

    @classmethod
    def parse(cls, spec: str, seed: int = 0) -> MissingConfig:
        """Parse ``"TYPE:RATE"`` (e.g. ``"both:0.7"``), as used on the command line."""
        kind, sep, rate = spec.partition(":")
        if not sep:
            raise ConfigError(
                f"missing setting must look like TYPE:RATE (e.g. both:0.7); got {spec!r}"
            )
        try:
            value = float(rate)
        except ValueError:
            raise ConfigError(f"missing rate in {spec!r} is not a number") from None
        return cls(type=kind, rate=value, seed=seed)

    def describe(self) -> str:
        """Human-readable setting, e.g. ``missing-both 70% (35% lose text, 35% lose image)``."""
        kind = MissingType(self.type)
        text = f"missing-{kind.value} {self.rate:.0%}"
        if kind is MissingType.BOTH and self.rate > 0:
            lose_text = self.rate * self.both_ratio
            text += f" ({lose_text:.0%} lose text, {self.rate - lose_text:.0%} lose image)"
        elif kind is MissingType.ANY:
            text += " per modality"
        return text

    @property
    def slug(self) -> str:
        """File-name-safe name of this setting, e.g. ``both-0.70-b0.50-s0``."""
        name = f"{MissingType(self.type).value}-{self.rate:.2f}"
        if self.type is MissingType.BOTH:
            name += f"-b{self.both_ratio:.2f}"
        if self.type is MissingType.ANY and self.allow_all_missing:
            name += "-all"
        return f"{name}-s{self.seed}"


@dataclass(frozen=True)
class MaskTable:
    """Presence flags for the samples of one split.

    Attributes:
        ids: sample ids, in table order.
        modalities: the dataset's modalities (the table's columns).
        present: bool array (len(ids), len(modalities)).
    """

    ids: tuple[str, ...]
    modalities: tuple[Modality, ...]
    present: np.ndarray

    def __post_init__(self) -> None:
        if self.present.shape != (len(self.ids), len(self.modalities)):
            raise ValueError(
                f"mask table shape {self.present.shape} does not match "
                f"{len(self.ids)} ids x {len(self.modalities)} modalities"
            )
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("mask table ids must be unique")

    def presence_tensor_rows(self, ids: Sequence[str] | None = None) -> np.ndarray:
        """Presence as (n, 3) bools in `MODALITY_ORDER` (absent dataset modalities are False).

        Args:
            ids: rows to return, in this order; all rows when None.
        """
        rows = self.present
        if ids is not None:
            index = {sample_id: i for i, sample_id in enumerate(self.ids)}
            try:
                rows = rows[[index[str(i)] for i in ids]]
            except KeyError as exc:
                raise KeyError(f"sample id {exc.args[0]!r} is not in the mask table") from None
        full = np.zeros((rows.shape[0], len(MODALITY_ORDER)), dtype=bool)
        for column, modality in enumerate(self.modalities):
            full[:, MODALITY_ORDER.index(modality)] = rows[:, column]
        return full

    def missing_rate(self, modality: Modality) -> float:
        """Share of samples lacking `modality`."""
        return float(1.0 - self.present[:, self.modalities.index(modality)].mean())


def make_mask_table(
    config: MissingConfig, ids: Sequence[str], modalities: Sequence[Modality | str]
) -> MaskTable:
    """Generate the seeded mask table of `config` for samples `ids` with `modalities`."""
    mods = tuple(Modality.parse(m) for m in modalities)
    if not mods:
        raise ConfigError("a mask table needs at least one modality")
    kind = MissingType(config.type)
    n = len(ids)
    rng = np.random.Generator(np.random.PCG64(config.seed))
    present = np.ones((n, len(mods)), dtype=bool)
    if kind is MissingType.ANY:
        present = rng.random((n, len(mods))) >= config.rate
        if not config.allow_all_missing and len(mods) > 0:
            empty = np.flatnonzero(~present.any(axis=1))
            keep = rng.integers(0, len(mods), size=empty.size)
            present[empty, keep] = True
    elif kind is MissingType.BOTH:
        for needed in (Modality.TEXT, Modality.IMAGE):
            if needed not in mods:
                raise ConfigError(
                    f"missing.type 'both' needs {needed.value}; dataset has {_names(mods)}"
                )
        chosen = rng.permutation(n)[: int(round(config.rate * n))]
        n_text = int(round(config.both_ratio * chosen.size))
        present[chosen[:n_text], mods.index(Modality.TEXT)] = False
        present[chosen[n_text:], mods.index(Modality.IMAGE)] = False
    else:
        target = Modality(kind.value)
        if target not in mods:
            raise ConfigError(
                f"missing.type {kind.value!r} needs that modality; dataset has {_names(mods)}"
            )
        if len(mods) == 1 and config.rate > 0:
            raise ConfigError(
                f"missing.type {kind.value!r} on a dataset whose only modality is {target.value} "
                "would leave samples with nothing to predict from"
            )
        chosen = rng.permutation(n)[: int(round(config.rate * n))]
        present[chosen, mods.index(target)] = False
    return MaskTable(ids=tuple(str(i) for i in ids), modalities=mods, present=present)


def _names(mods: Sequence[Modality]) -> str:
    return ", ".join(m.value for m in mods)


def write_mask_table(table: MaskTable, path: str | Path) -> Path:
    """Write `table` as CSV (``id,<modality>...`` with 0/1), atomically."""
    path = Path(path)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", *(m.value for m in table.modalities)])
    for sample_id, row in zip(table.ids, table.present):
        writer.writerow([sample_id, *(int(v) for v in row)])
    return atomic_write_text(path, buffer.getvalue())


def read_mask_table(path: str | Path) -> MaskTable:
    """Read a table written by `write_mask_table`; malformed files raise naming the line."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"mask table not found: {path}")
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows or not rows[0] or rows[0][0] != "id":
        raise DataFormatError(f"{path}: a mask table starts with a header 'id,<modality>...'")
    try:
        mods = tuple(Modality.parse(name) for name in rows[0][1:])
    except ValueError as exc:
        raise DataFormatError(f"{path}: bad header: {exc}") from None
    ids: list[str] = []
    flags: list[list[bool]] = []
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(mods) + 1 or any(v not in ("0", "1") for v in row[1:]):
            raise DataFormatError(f"{path}:{number}: expected id and {len(mods)} flags of 0/1")
        ids.append(row[0])
        flags.append([v == "1" for v in row[1:]])
    present = np.array(flags, dtype=bool).reshape(len(ids), len(mods))
    try:
        return MaskTable(ids=tuple(ids), modalities=mods, present=present)
    except ValueError as exc:
        raise DataFormatError(f"{path}: {exc}") from None


def get_mask_table(
    config: MissingConfig,
    dataset: str,
    split: str,
    ids: Sequence[str],
    modalities: Sequence[Modality | str],
    root: str | Path,
) -> MaskTable:
    """Read the table of (`dataset`, `split`, `config`) under `root`, creating it the first time.

    The file is ``root/<dataset>/<split>/<config.slug>.csv``. An existing file whose ids differ
    from `ids` is an error rather than silently regenerated, since methods compared on it would
    no longer see the same samples.
    """
    path = Path(root) / dataset / split / f"{config.slug}.csv"
    expected = tuple(str(i) for i in ids)
    if path.is_file():
        table = read_mask_table(path)
        if table.ids != expected:
            raise DataFormatError(
                f"{path}: its sample ids differ from the {dataset}/{split} split; "
                "delete the file to regenerate it for the new data"
            )
        return table
    table = make_mask_table(config, expected, modalities)
    write_mask_table(table, path)
    return table
