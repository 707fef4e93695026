"""Modalities, presence masks and the Sample/Batch containers every component exchanges.

Absence is always explicit: a sample carries a `Presence` next to its payloads, and a batch carries
a boolean presence tensor. A payload that is empty where the mask says "present" is rejected at the
boundary, and a payload given for a modality the mask says is absent is rejected too, so a missing
input can never leak into a model by accident.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import torch


class Modality(str, Enum):
    """An input modality."""

    IMAGE = "image"
    TEXT = "text"
    AUDIO = "audio"

    @classmethod
    def parse(cls, value: str | Modality) -> Modality:
        """Return the modality named `value`, with an error listing the allowed names."""
        if isinstance(value, Modality):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            allowed = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown modality {value!r}; allowed: {allowed}") from None


#: The fixed column order of presence tensors: column i is `MODALITY_ORDER[i]`.
MODALITY_ORDER: tuple[Modality, ...] = (Modality.IMAGE, Modality.TEXT, Modality.AUDIO)


def presence_codes(
    presence: torch.Tensor, modalities: Sequence[str | Modality] = MODALITY_ORDER
) -> torch.Tensor:
    """Per-row presence pattern as an integer: bit i set when ``modalities[i]`` is present.

    Args:
        presence: bool (batch, 3) with columns in `MODALITY_ORDER`.
        modalities: the modalities the bits stand for, in bit order.
    """
    columns = [MODALITY_ORDER.index(Modality.parse(m)) for m in modalities]
    flags = presence[:, columns].long()
    weights = 2 ** torch.arange(len(columns), device=presence.device)
    return (flags * weights).sum(dim=1)


class EmptyPayloadError(ValueError):
    """A modality is marked present but its payload is empty, or absent but a payload is given."""


def is_empty_payload(value: Any) -> bool:
    """True for `None`, blank strings, and zero-size arrays, tensors, bytes or sequences."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, torch.Tensor):
        return value.numel() == 0
    if isinstance(value, np.ndarray):
        return value.size == 0
    if isinstance(value, (bytes, bytearray, list, tuple, dict)):
        return len(value) == 0
    return False


@dataclass(frozen=True)
class Presence:
    """Which modalities one sample has.

    Attributes:
        modalities: the present modalities.
    """

    modalities: frozenset[Modality]

    @classmethod
    def of(cls, *modalities: str | Modality) -> Presence:
        """Build a presence from modality names, e.g. `Presence.of("image", "text")`."""
        return cls(frozenset(Modality.parse(m) for m in modalities))

    @classmethod
    def from_flags(cls, flags: Sequence[bool] | np.ndarray | torch.Tensor) -> Presence:
        """Build a presence from one row of a presence tensor (columns in `MODALITY_ORDER`)."""
        values = [bool(v) for v in (flags.tolist() if hasattr(flags, "tolist") else flags)]
        if len(values) != len(MODALITY_ORDER):
            raise ValueError(f"a presence row has {len(MODALITY_ORDER)} flags, got {len(values)}")
        return cls(frozenset(m for m, v in zip(MODALITY_ORDER, values) if v))

    def __contains__(self, modality: object) -> bool:
        return Modality.parse(modality) in self.modalities  # type: ignore[arg-type]

    def flags(self) -> list[bool]:
        """The presence as booleans in `MODALITY_ORDER`."""
        return [m in self.modalities for m in MODALITY_ORDER]

    def missing(self, available: Iterable[Modality]) -> frozenset[Modality]:
        """The modalities of `available` that this sample lacks."""
        return frozenset(available) - self.modalities

    @property
    def pattern(self) -> str:
        """A stable name for the presence pattern, e.g. ``"image+text"`` or ``"none"``."""
        names = [m.value for m in MODALITY_ORDER if m in self.modalities]
        return "+".join(names) if names else "none"


@dataclass
class Sample:
    """One input: payloads for the present modalities, the presence, and an optional label.

    Args:
        presence: which modalities this sample has.
        payloads: modality -> payload (an image, a string, a waveform, an embedding...). Exactly the
            present modalities must have a non-empty payload.
        label: the target, if known.
        id: a stable identifier (used by mask tables and result files).
    """

    presence: Presence
    payloads: Mapping[Modality, Any] = field(default_factory=dict)
    label: Any = None
    id: str = ""

    def __post_init__(self) -> None:
        self.payloads = {Modality.parse(k): v for k, v in self.payloads.items()}
        where = f"sample {self.id!r}" if self.id else "sample"
        if not self.presence.modalities:
            raise EmptyPayloadError(f"{where}: every modality is missing; nothing to predict from")
        for modality in self.presence.modalities:
            if is_empty_payload(self.payloads.get(modality)):
                raise EmptyPayloadError(
                    f"{where}: {modality.value} is marked present but its payload is empty"
                )
        for modality, value in self.payloads.items():
            if modality not in self.presence.modalities and value is not None:
                raise EmptyPayloadError(
                    f"{where}: {modality.value} is marked missing but a payload was given; "
                    "drop it so the missing input cannot leak into the model"
                )


@dataclass
class Batch:
    """A batch of samples: per-modality payloads plus a presence tensor.

    Args:
        presence: bool tensor of shape (batch, 3), columns in `MODALITY_ORDER`.
        payloads: modality -> a tensor whose first dimension is the batch, or a list of per-sample
            payloads with `None` at absent rows. Rows of absent samples in a tensor must be zero.
        labels: optional tensor of targets.
        ids: optional sample identifiers.
    """

    presence: torch.Tensor
    payloads: dict[Modality, Any] = field(default_factory=dict)
    labels: torch.Tensor | None = None
    ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.payloads = {Modality.parse(k): v for k, v in self.payloads.items()}
        if self.presence.dtype != torch.bool:
            self.presence = self.presence.bool()
        if self.presence.ndim != 2 or self.presence.shape[1] != len(MODALITY_ORDER):
            raise ValueError(
                f"presence must have shape (batch, {len(MODALITY_ORDER)}), "
                f"got {tuple(self.presence.shape)}"
            )
        size = self.presence.shape[0]
        if self.ids and len(self.ids) != size:
            raise ValueError(f"batch has {size} presence rows but {len(self.ids)} ids")
        if self.labels is not None and self.labels.shape[0] != size:
            raise ValueError(f"batch has {size} presence rows but {self.labels.shape[0]} labels")
        if size and not bool(self.presence.any(dim=1).all()):
            row = int((~self.presence.any(dim=1)).nonzero()[0])
            raise EmptyPayloadError(f"{self._name(row)}: every modality is missing")
        for column, modality in enumerate(MODALITY_ORDER):
            self._check_column(modality, self.presence[:, column])

    def _name(self, row: int) -> str:
        return f"batch row {row}" + (f" (id {self.ids[row]!r})" if self.ids else "")

    def _check_column(self, modality: Modality, present: torch.Tensor) -> None:
        payload = self.payloads.get(modality)
        if payload is None:
            if bool(present.any()):
                row = int(present.nonzero()[0])
                raise EmptyPayloadError(
                    f"{self._name(row)}: {modality.value} is marked present but the batch has "
                    f"no {modality.value} payload"
                )
            return
        if len(payload) != present.shape[0]:
            raise ValueError(
                f"{modality.value} payload has {len(payload)} rows, presence has {present.shape[0]}"
            )
        if isinstance(payload, torch.Tensor):
            flat = payload.reshape(payload.shape[0], -1)
            if flat.shape[1] == 0 and bool(present.any()):
                raise EmptyPayloadError(f"{modality.value} payload tensor is empty")
            leaked = (~present) & flat.ne(0).any(dim=1)
            if bool(leaked.any()):
                row = int(leaked.nonzero()[0])
                raise EmptyPayloadError(
                    f"{self._name(row)}: {modality.value} is marked missing but its row is "
                    "non-zero; zero absent rows so the missing input cannot leak"
                )
            return
        for row, value in enumerate(payload):
            if bool(present[row]) and is_empty_payload(value):
                raise EmptyPayloadError(
                    f"{self._name(row)}: {modality.value} is marked present but its payload is empty"
                )
            if not bool(present[row]) and value is not None:
                raise EmptyPayloadError(
                    f"{self._name(row)}: {modality.value} is marked missing but a payload was given"
                )

    def __len__(self) -> int:
        return int(self.presence.shape[0])

    def present(self, modality: str | Modality) -> torch.Tensor:
        """Bool tensor (batch,) saying which rows have `modality`."""
        return self.presence[:, MODALITY_ORDER.index(Modality.parse(modality))]

    def patterns(self) -> list[str]:
        """The presence pattern name of every row (see `Presence.pattern`)."""
        return [Presence.from_flags(row).pattern for row in self.presence]

    def to(self, device: torch.device | str) -> Batch:
        """A copy with every tensor moved to `device`."""
        return Batch(
            presence=self.presence.to(device),
            payloads={
                k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                for k, v in self.payloads.items()
            },
            labels=None if self.labels is None else self.labels.to(device),
            ids=list(self.ids),
        )

    @classmethod
    def collate(cls, samples: Sequence[Sample]) -> Batch:
        """Stack samples: tensor payloads are stacked with zero rows where absent, others listed."""
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        presence = torch.tensor([s.presence.flags() for s in samples], dtype=torch.bool)
        payloads: dict[Modality, Any] = {}
        for modality in MODALITY_ORDER:
            values = [s.payloads.get(modality) if modality in s.presence else None for s in samples]
            present = [v for v in values if v is not None]
            if not present:
                continue
            if all(isinstance(v, torch.Tensor) for v in present):
                template = torch.zeros_like(present[0])
                payloads[modality] = torch.stack([template if v is None else v for v in values])
            else:
                payloads[modality] = values
        labels = None
        if all(s.label is not None for s in samples):
            labels = torch.as_tensor(np.asarray([np.asarray(s.label) for s in samples]))
        return cls(presence=presence, payloads=payloads, labels=labels, ids=[s.id for s in samples])


def status_text(
    presence: Presence, modalities: Iterable[str | Modality] = ("image", "text")
) -> str:
    """The MissRAG-style status line for `presence`, modalities in `MODALITY_ORDER`.

    >>> status_text(Presence.of("text"))
    'Input modality status: image: missing; text: present.'
    """
    wanted = {Modality.parse(m) for m in modalities}
    parts = [
        f"{m.value}: {'present' if m in presence else 'missing'}"
        for m in MODALITY_ORDER
        if m in wanted
    ]
    return "Input modality status: " + "; ".join(parts) + "."
