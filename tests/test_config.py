"""Tests of YAML configs + overrides, and a parse of every shipped recipe config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from mllm_missing.config import load_config, parse_overrides
from mllm_missing.errors import ConfigError
from mllm_missing.quickstart import QuickstartConfig

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "configs"


@dataclass
class Toy:
    rate: float = 0.5
    name: str = "a"
    sizes: tuple[int, ...] = (1,)
    limit: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.rate <= 1:
            raise ConfigError(f"rate must be in [0, 1]; got {self.rate}")


def test_file_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("rate: 1\nsizes: [2, 3]\n")
    config = load_config(Toy, path, ["name=b", "limit=7"])
    assert config == Toy(rate=1.0, name="b", sizes=(2, 3), limit=7)
    assert load_config(Toy, None, {"limit": None}).limit is None


@pytest.mark.parametrize(
    "text,overrides,message",
    [
        ("rat: 0.1\n", [], r"unknown key 'rat'; allowed: limit, name, rate, sizes"),
        ("rate: high\n", [], "rate must be float"),
        ("rate: 3\n", [], r"c\.yaml: rate must be in \[0, 1\]"),
        ("sizes: 4\n", [], "sizes must be a list"),
        ("- 1\n", [], "top level must be a mapping"),
        ("rate: [\n", [], "not valid YAML"),
        ("", ["limit=x"], "limit must be int"),
        ("", ["sizes=[1, true]"], r"sizes\[1\] must be int"),
        ("", ["novalue"], "key=value"),
    ],
)
def test_bad_configs_name_the_field(
    tmp_path: Path, text: str, overrides: list[str], message: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(Toy, path, overrides)


def test_missing_file_and_override_parsing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Toy, tmp_path / "none.yaml")
    assert parse_overrides(["a=1", "b=[x, y]", "c=both:0.7", "d="]) == {
        "a": 1,
        "b": ["x", "y"],
        "c": "both:0.7",
        "d": None,
    }


@pytest.mark.parametrize("path", sorted(RECIPES.rglob("*heads.yaml")), ids=lambda p: p.name)
def test_every_shipped_heads_config_parses(path: Path) -> None:
    # The strategy recipes (TrainConfig) are parsed in tests/training/test_recipes.py.
    config = load_config(QuickstartConfig, path)
    assert config.methods and config.epochs > 0


def test_the_recipe_config_matches_the_readme_defaults() -> None:
    shipped = load_config(QuickstartConfig, RECIPES / "easy_vqa" / "offline_heads.yaml")
    defaults = QuickstartConfig()
    assert {k: v for k, v in vars(shipped).items() if k != "output_dir"} == {
        k: v for k, v in vars(defaults).items() if k != "output_dir"
    }
