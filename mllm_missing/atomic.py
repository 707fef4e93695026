"""Atomic writes: a file or folder appears complete under its name, or not at all.

Everything this package writes to disk for later runs (mask tables, caches, checkpoints, memory
banks, results) goes through here, so an interrupted run never leaves a half-written artifact.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_directory", "atomic_write", "atomic_write_text"]


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(temporary_path)`` then rename the result to `path` in one step.

    Args:
        path: the final file.
        write: writes the whole file at the path it is given.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        write(partial)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_write(path, lambda partial: partial.write_text(text, encoding="utf-8"))


@contextmanager
def atomic_directory(directory: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """Build a folder atomically: fill the yielded temporary folder; on success it takes
    `directory`'s place in one rename, on error it is removed and `directory` is untouched.

    Args:
        directory: the final folder.
        replace: replace an existing `directory` (it is moved aside, then deleted; files that a
            reader has memory-mapped stay readable). With False an existing folder wins, which
            suits caches that concurrent processes may fill with the same content.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=directory.parent))
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    old = None
    if directory.exists():
        if not replace:
            shutil.rmtree(partial, ignore_errors=True)
            return
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        os.replace(directory, old)
    try:
        os.replace(partial, directory)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
        if not directory.exists():  # not a concurrent writer winning the race: a real failure
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
