"""Tests of the atomic file and folder writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from mllm_missing.atomic import atomic_directory, atomic_write, atomic_write_text


def test_failed_file_write_keeps_the_old_file_and_leaves_no_partial(tmp_path: Path) -> None:
    path = atomic_write_text(tmp_path / "sub" / "a.txt", "old")
    assert path.read_text() == "old"

    def broken(partial: Path) -> None:
        partial.write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write(path, broken)
    assert path.read_text() == "old"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]


def test_directory_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "bank"
    with atomic_directory(target) as partial:
        (partial / "x").write_text("1")
        assert not target.exists()
    assert (target / "x").read_text() == "1"
    with pytest.raises(ValueError), atomic_directory(target) as partial:
        (partial / "x").write_text("2")
        raise ValueError("interrupted")
    assert (target / "x").read_text() == "1"
    with atomic_directory(target) as partial:
        (partial / "y").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["y"]
    with atomic_directory(target, replace=False) as partial:
        (partial / "z").write_text("4")
    assert sorted(p.name for p in target.iterdir()) == ["y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]
