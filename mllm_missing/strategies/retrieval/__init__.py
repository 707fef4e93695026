"""Retrieval memory bank: exact, presence-aware nearest neighbours over training embeddings.

Build one with `build_memory_bank(ids, {"image": ..., "text": ...}, presence)` (or
`MemoryBank.build`), save it with `MemoryBank.save` and memory-map it back with
`MemoryBank.load`; `MemoryBank.search` returns the top-k cosine neighbours and
`MemoryBank.neighbour_mean` averages their raw embeddings; `index_rows` indexes a training
split's present inputs and `MemoryBank.impute` gives each row its neighbours' mean (kNN imputation).
"""

from mllm_missing.strategies.retrieval.bank import MemoryBank, build_memory_bank, index_rows
from mllm_missing.strategies.retrieval.config import DTYPES, METRICS, MemoryBankConfig
from mllm_missing.strategies.retrieval.search import chunked_topk

__all__ = [
    "DTYPES",
    "METRICS",
    "MemoryBank",
    "MemoryBankConfig",
    "build_memory_bank",
    "chunked_topk",
    "index_rows",
]
