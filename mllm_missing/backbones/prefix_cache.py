"""Frozen-prefix cache: the token states entering a tower's first prompted block, per input.

A prompt strategy whose first prompted block is k > 0 leaves blocks 0..k-1 of a frozen tower
exactly as they were, so their output depends on the input alone. A tower with a `PrefixCache`
computes those states once per distinct input and afterwards runs only blocks k and above: on
easy-VQA's rag_prompts recipe (prompts in MiniLM's last block only, every row a distinct
retrieval context) that skips five of six blocks' forward passes at every step.

The cache is an LRU map bounded in bytes. Its keys are (start block, the input's real token ids
and token types); the tower checks on each call that nothing below the start block can have
changed (no trainable parameter, no adapter layer), and empties the cache when the tower moves to
another device or dtype. A tower whose frozen weights are replaced in place must call `clear`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

import torch

__all__ = ["DEFAULT_PREFIX_CACHE_BYTES", "PrefixCache"]

DEFAULT_PREFIX_CACHE_BYTES = 512 * 2**20


class PrefixCache:
    """Per-input token states (length, hidden) at one block, least recently used evicted first.

    Args:
        max_bytes: bound on the stored tensors' total size; 0 stores nothing.

    Raises:
        ValueError: `max_bytes` is negative.
    """

    def __init__(self, max_bytes: int = DEFAULT_PREFIX_CACHE_BYTES):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0; got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._states: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._where: tuple[torch.device, torch.dtype] | None = None
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._states)

    def clear(self) -> None:
        """Drop every stored state (the counters stay)."""
        self._states.clear()
        self.bytes = 0

    def lookup(
        self, keys: Sequence[Hashable], device: torch.device, dtype: torch.dtype
    ) -> list[torch.Tensor | None]:
        """The stored state of each key (None where absent), marking the found ones recent.
        States stored for another device or dtype are dropped first."""
        if self._where != (device, dtype):
            self.clear()
            self._where = (device, dtype)
        found: list[torch.Tensor | None] = []
        for key in keys:
            state = self._states.get(key)
            if state is not None:
                self._states.move_to_end(key)
            found.append(state)
        hits = sum(state is not None for state in found)
        self.hits += hits
        self.misses += len(found) - hits
        return found

    def store(self, key: Hashable, state: torch.Tensor) -> None:
        """Keep `state` (detached) under `key`, evicting the least recently used as needed."""
        state = state.detach()
        size = state.numel() * state.element_size()
        if size > self.max_bytes:
            return
        old = self._states.pop(key, None)
        if old is not None:
            self.bytes -= old.numel() * old.element_size()
        while self._states and self.bytes + size > self.max_bytes:
            _, evicted = self._states.popitem(last=False)
            self.bytes -= evicted.numel() * evicted.element_size()
        self._states[key] = state
        self.bytes += size
