"""Typed configs from YAML files plus ``key=value`` overrides, checked before any work starts.

A config file maps field names of a config dataclass to values. Unknown keys, values of the wrong
type and values the dataclass's own checks refuse all fail at load time with a message naming
the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mllm_missing.errors import ConfigError

__all__ = ["load_config", "parse_overrides"]

T = TypeVar("T")


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings; values are read as YAML (``epochs=3``, ``methods=[zero]``)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key=value")
        try:
            overrides[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
    return overrides


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a field annotation, converting lists to tuples where declared."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(name, value, option)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{name}: bad value {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list; got {value!r}")
        item_type = args[0] if args else Any
        items = [_coerce(f"{name}[{i}]", v, item_type) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping; got {value!r}")
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if isinstance(value, bool) and annotation is not bool:
            raise ConfigError(f"{name} must be {annotation.__name__}; got {value!r}")
        if not isinstance(value, annotation):
            raise ConfigError(f"{name} must be {annotation.__name__}; got {value!r}")
    return value


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: Sequence[str] | dict[str, Any] = ()
) -> T:
    """Build the dataclass `cls` from a YAML file and overrides (overrides win).

    Args:
        cls: a dataclass type whose fields are the allowed keys.
        path: YAML file with a mapping at the top level, or None for defaults plus overrides.
        overrides: ``key=value`` strings or a mapping.

    Raises:
        ConfigError: unreadable file, unknown key (the message lists the allowed keys), or a value
            of the wrong type or out of range (the message names the field).
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of field: value")
        values.update(loaded)
    values.update(overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    where = f"{path}: " if path is not None else ""
    for key in values:
        if key not in fields:
            raise ConfigError(f"{where}unknown key {key!r}; allowed: {', '.join(sorted(fields))}")
    checked = {key: _coerce(key, value, hints[key]) for key, value in values.items()}
    try:
        return cls(**checked)
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None
