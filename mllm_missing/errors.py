"""Error types shared across the package, so callers can catch one family per problem."""

from __future__ import annotations


class MllmMissingError(Exception):
    """Base class of this package's errors."""


class DataFormatError(MllmMissingError, ValueError):
    """A data file is missing, unreadable or malformed; the message names the file."""


class ConfigError(MllmMissingError, ValueError):
    """A configuration value is out of range or unknown; the message names the field."""


class MissingDependencyError(MllmMissingError, ImportError):
    """An optional dependency is not installed; the message gives the install command."""


def require(module: str, extra: str, package: str | None = None) -> None:
    """Import `module` or raise `MissingDependencyError` naming the extra that provides it."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as exc:
        name = package or module
        raise MissingDependencyError(
            f"{name} is not installed; install it with: pip install 'mllm-missing[{extra}]'"
        ) from exc
