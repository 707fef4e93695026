"""Configuration of a retrieval memory bank."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from mllm_missing.errors import ConfigError

#: Storage dtypes of the normalised search matrices (numpy has no bfloat16).
DTYPES: tuple[str, ...] = ("float32", "float16")
#: Similarity metrics. Only cosine for now: vectors are L2-normalised once at build time and
#: scored with a dot product; an inner-product or L2 metric would need other stored copies.
METRICS: tuple[str, ...] = ("cosine",)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"memory_bank.{name} must be an integer >= {minimum}; got {value!r}")


@dataclass(frozen=True)
class MemoryBankConfig:
    """How a `MemoryBank` stores and searches its embeddings.

    Args:
        k: neighbours returned by `MemoryBank.search` when it is not given `k`.
        chunk_size: bank rows scored per step; the search holds at most
            (queries x chunk_size) scores at a time, never the full (queries x entries) matrix.
        dtype: storage dtype of the normalised search matrices, one of `DTYPES`
            (``float16`` halves the memory and the files; scores are computed in float32).
        metric: similarity metric, one of `METRICS`; only ``cosine`` for now.
        source: free-form provenance, e.g. which encoder, dataset and split made the bank.
    """

    k: int = 5
    chunk_size: int = 8192
    dtype: str = "float32"
    metric: str = "cosine"
    source: str = ""

    def __post_init__(self) -> None:
        _check_int("k", self.k, 1)
        _check_int("chunk_size", self.chunk_size, 1)
        if self.dtype not in DTYPES:
            raise ConfigError(
                f"memory_bank.dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}"
            )
        if self.metric not in METRICS:
            raise ConfigError(
                f"memory_bank.metric must be one of {', '.join(METRICS)}; got {self.metric!r}"
            )
        if not isinstance(self.source, str):
            raise ConfigError(f"memory_bank.source must be a string; got {self.source!r}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MemoryBankConfig:
        """Build a config from `values`, rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown memory_bank field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}"
            )
        return cls(**dict(values))
