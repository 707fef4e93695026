"""Shared test setup: offline, and every cache under a per-session temporary folder."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Point the package cache at a session folder so tests never touch ~/.cache."""
    os.environ["MLLM_MISSING_CACHE"] = str(tmp_path_factory.mktemp("mllm_missing_cache"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip GPU tests cleanly when no CUDA device is present."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _load_fixtures() -> ModuleType:
    # Loaded by path under a unique name: tests/ has no packages, so a bare `import fixtures`
    # could pick up another folder's module of the same name.
    name = "mllm_missing_tests_data_fixtures"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).parent / "data" / "fixtures.py"
        )
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
    return Path(__file__).resolve().parents[1]
