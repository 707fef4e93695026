"""Fixtures of the data tests: tiny official-format releases written into tmp_path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest


def _load_fixtures() -> ModuleType:
    # Loaded by path under a unique name: tests/ has no packages, so a bare `import fixtures`
    # could pick up another folder's module of the same name.
    name = "mllm_missing_tests_data_fixtures"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("fixtures.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def fx() -> ModuleType:
    """The fixture writers and the data they write (tests/data/fixtures.py)."""
    return _load_fixtures()


@pytest.fixture
def mmimdb_root(tmp_path: Path, fx: ModuleType) -> Path:
    """A fresh MM-IMDb release (see `fixtures.MMIMDB_MOVIES`)."""
    return fx.write_mmimdb(tmp_path / "mmimdb")


@pytest.fixture
def memes_root(tmp_path: Path, fx: ModuleType) -> Path:
    """A fresh Hateful Memes release (see `fixtures.MEMES`)."""
    return fx.write_hateful_memes(tmp_path / "hateful_memes")


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """A cache folder private to the test."""
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (where scripts/ lives)."""
    return Path(__file__).resolve().parents[2]
