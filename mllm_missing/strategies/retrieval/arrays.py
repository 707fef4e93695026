"""Checks and cosine normalisation of the arrays a memory bank is built from."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from mllm_missing.types import MODALITY_ORDER, Modality

# Rows normalised per step at build time, to bound the float32 temporaries.
_BUILD_BLOCK = 65536


def check_ids(ids: Sequence[str]) -> list[str]:
    """The ids as a list, refusing an empty, non-string or duplicated one (naming the row)."""
    checked = list(ids)
    if not checked:
        raise ValueError("a memory bank needs at least one entry; got no ids")
    seen: set[str] = set()
    for row, entry in enumerate(checked):
        if not isinstance(entry, str):
            raise ValueError(f"ids must be strings; row {row} is {entry!r}")
        if entry in seen:
            raise ValueError(f"duplicate id {entry!r} (row {row})")
        seen.add(entry)
    return checked


def parse_embeddings(
    embeddings: Mapping[str | Modality, torch.Tensor | np.ndarray], rows: int
) -> dict[Modality, torch.Tensor]:
    """Modality -> float CPU tensor (rows, D), refusing a bad shape, dtype or duplicate key."""
    parsed: dict[Modality, torch.Tensor] = {}
    for key, values in embeddings.items():
        modality = Modality.parse(key)
        if modality in parsed:
            raise ValueError(f"{modality.value} embeddings given twice")
        tensor = torch.as_tensor(values)
        if tensor.ndim != 2 or tensor.shape[0] != rows or tensor.shape[1] == 0:
            raise ValueError(
                f"{modality.value} embeddings have shape {tuple(tensor.shape)}, "
                f"expected ({rows}, D) for {rows} ids"
            )
        if not tensor.is_floating_point():
            raise ValueError(f"{modality.value} embeddings must be floats, got {tensor.dtype}")
        parsed[modality] = tensor.detach().cpu()
    if not parsed:
        raise ValueError("a memory bank needs embeddings of at least one modality")
    return parsed


def presence_columns(
    presence: torch.Tensor | np.ndarray, rows: int, modalities: Sequence[Modality], what: str
) -> torch.Tensor:
    """Bool (rows, len(modalities)) from a mask in `modalities` or in `MODALITY_ORDER` order."""
    mask = torch.as_tensor(presence)
    if mask.ndim != 2 or mask.shape[0] != rows:
        raise ValueError(f"{what} presence has shape {tuple(mask.shape)}, expected ({rows}, M)")
    if mask.shape[1] == len(modalities):
        return mask.to(torch.bool).cpu()
    if mask.shape[1] == len(MODALITY_ORDER):
        columns = [MODALITY_ORDER.index(m) for m in modalities]
        return mask[:, columns].to(torch.bool).cpu()
    names = ", ".join(m.value for m in modalities)
    raise ValueError(
        f"{what} presence has {mask.shape[1]} columns; expected {len(modalities)} ({names}) "
        f"or {len(MODALITY_ORDER)} (MODALITY_ORDER)"
    )


def normalise_rows(
    modality: Modality, values: torch.Tensor, present: torch.Tensor, ids: Sequence[str], dtype: str
) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows (absent rows zero) in `dtype` and their float32 norms (absent rows zero)."""
    rows, dim = values.shape
    normalised = np.empty((rows, dim), dtype=dtype)
    norms = np.empty(rows, dtype=np.float32)
    for start in range(0, rows, _BUILD_BLOCK):
        stop = min(start + _BUILD_BLOCK, rows)
        block = values[start:stop].to(torch.float32)
        keep = present[start:stop]
        bad = keep & ~torch.isfinite(block).all(dim=1)
        if bool(bad.any()):
            row = start + int(torch.nonzero(bad)[0])
            raise ValueError(
                f"{modality.value} embeddings: row {row} (id {ids[row]!r}) has NaN or inf values"
            )
        block = torch.where(keep.unsqueeze(1), block, torch.zeros((), dtype=block.dtype))
        norm = torch.linalg.vector_norm(block, dim=1)
        zero = keep & (norm == 0)
        if bool(zero.any()):
            row = start + int(torch.nonzero(zero)[0])
            raise ValueError(
                f"{modality.value} embeddings: row {row} (id {ids[row]!r}) is a zero vector, "
                "for which cosine similarity is undefined; mark the modality absent instead"
            )
        unit = block / norm.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
        normalised[start:stop] = unit.to(getattr(torch, dtype)).numpy()
        norms[start:stop] = norm.numpy()
    return normalised, norms
