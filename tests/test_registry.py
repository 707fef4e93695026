"""Tests of the lazy registry."""

from __future__ import annotations

import sys

import pytest

from mllm_missing.registry import Registry


def test_register_and_get() -> None:
    registry: Registry[type] = Registry("widget")

    @registry.register("a")
    class A:
        pass

    assert registry.get("a") is A
    assert "a" in registry and registry.names() == ["a"]
    with pytest.raises(KeyError, match="unknown widget 'b'; registered: a"):
        registry.get("b")
    with pytest.raises(ValueError, match="already registered"):
        registry.register("a")(type("B", (), {}))


def test_lazy_entry_imports_only_on_get() -> None:
    registry: Registry[object] = Registry("thing")
    sys.modules.pop("json.tool", None)
    registry.register_lazy("tool", "json.tool:main")
    assert "json.tool" not in sys.modules
    assert callable(registry.get("tool"))
    assert "json.tool" in sys.modules
    with pytest.raises(ValueError, match="module:attr"):
        registry.register_lazy("bad", "json.tool")


def test_import_is_light() -> None:
    import subprocess

    code = (
        "import sys, mllm_missing, mllm_missing.types, mllm_missing.missing, mllm_missing.data;"
        "heavy = [m for m in ('open_clip', 'bitsandbytes', 'vllm', 'sentence_transformers',"
        " 'transformers', 'datasets') if m in sys.modules]; print(heavy); assert not heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
