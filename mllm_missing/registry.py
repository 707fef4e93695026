"""One small lazy registry used by every extension point (strategies, datasets, backbones...).

Entries are either registered objects (a decorator on the class) or lazy `"module:attr"` strings
that are imported on first use, so heavy optional dependencies never load at import time.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object table with lazy `"module:attr"` entries.

    Args:
        kind: what the entries are, used in error messages (e.g. ``"strategy"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T | str] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering the decorated object under `name`."""

        def decorate(obj: T) -> T:
            self._add(name, obj)
            return obj

        return decorate

    def register_lazy(self, name: str, target: str) -> None:
        """Register `target` (``"package.module:attr"``), imported on first `get`."""
        if ":" not in target:
            raise ValueError(
                f"lazy {self.kind} target must look like 'module:attr', got {target!r}"
            )
        self._add(name, target)

    def _add(self, name: str, obj: T | str) -> None:
        existing = self._entries.get(name)
        if existing is not None and existing is not obj and not isinstance(existing, str):
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj

    def get(self, name: str) -> T:
        """Return the entry `name`, importing it if it was registered lazily."""
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")
        entry = self._entries[name]
        if isinstance(entry, str):
            module_name, _, attr = entry.partition(":")
            module = importlib.import_module(module_name)
            # Importing the module usually registers the real object through its decorator.
            resolved = self._entries[name]
            entry = getattr(module, attr) if isinstance(resolved, str) else resolved
            self._entries[name] = entry
        return entry

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


def load_all(registry: Registry[Any]) -> dict[str, Any]:
    """Resolve every entry of `registry` (imports lazy ones); handy for listings and tests."""
    return {name: registry.get(name) for name in registry.names()}
