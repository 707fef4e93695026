"""The shared strategy battery on tiny CLIP (both towers) and tiny Llama, for every strategy."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mllm_missing.strategies.base import StrategyConfig, strategy_config_from_dict
from mllm_missing.strategies.testing import check_strategy, tiny_clip, tiny_llama
from mllm_missing.types import Modality

IMAGE, TEXT = Modality.IMAGE, Modality.TEXT
TEXTS = ["what color is the circle", "is there a red shape", "how many shapes", "a blue one"]

#: Every strategy config the battery runs (the peft-style ALL_CONFIGS list).
ALL_CONFIGS: list[dict[str, Any]] = [
    {"method": "map_prompts", "prompt_type": "input", "prompt_length": 3},
    {"method": "map_prompts", "prompt_type": "attention", "prompt_length": 3},
    {"method": "map_prompts", "prompt_type": "input", "prompt_length": 2, "prompt_layers": [-1]},
    {"method": "modality_prompts", "prompt_type": "input", "prompt_length": 2},
    {"method": "modality_prompts", "prompt_type": "attention", "prompt_length": 2},
    {"method": "correlated_prompts", "prompt_type": "input", "prompt_length": 2, "rank": 4},
    {"method": "correlated_prompts", "prompt_type": "attention", "prompt_length": 2, "rank": 4},
    {"method": "correlated_prompts", "prompt_length": 2, "rank": 4, "common_dim": 0},
    {"method": "lora", "r": 2},
    {"method": "lora", "r": 2, "routed": True},
]


def _id(values: dict[str, Any]) -> str:
    return "-".join(str(v) for k, v in values.items() if k != "prompt_length")


def images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(count)
    ]


def config(values: dict[str, Any]) -> StrategyConfig:
    return strategy_config_from_dict(values)


@pytest.mark.parametrize("values", ALL_CONFIGS, ids=_id)
def test_battery_tiny_clip(values: dict[str, Any]) -> None:
    pytest.importorskip("open_clip")
    raw = {IMAGE: images(4), TEXT: TEXTS}
    check_strategy(config(values), tiny_clip, raw, (IMAGE, TEXT))


@pytest.mark.parametrize("values", ALL_CONFIGS, ids=_id)
def test_battery_tiny_llama(values: dict[str, Any]) -> None:
    check_strategy(config(values), tiny_llama, {TEXT: TEXTS}, (IMAGE, TEXT))


#: Strategies that need a tower for every dataset modality (tiny CLIP only).
RETRIEVING_CONFIGS: list[dict[str, Any]] = [
    {"method": "rag_prompts", "prompt_type": "input", "prompt_length": 2, "hidden_size": 8},
    {"method": "rag_prompts", "prompt_type": "attention", "prompt_length": 2, "hidden_size": 8},
    {
        "method": "rag_prompts",
        "prompt_length": 2,
        "hidden_size": 8,
        "k": 1,
        "bank_dtype": "float32",
    },
    {"method": "rag_prompts", "prompt_length": 2, "hidden_size": 8, "retrieval": False},
    {"method": "rag_prompts", "prompt_length": 2, "hidden_size": 8, "label_context": True},
]


@pytest.mark.parametrize("values", RETRIEVING_CONFIGS, ids=_id)
def test_battery_tiny_clip_retrieving(values: dict[str, Any]) -> None:
    pytest.importorskip("open_clip")
    raw = {IMAGE: images(4), TEXT: TEXTS}
    check_strategy(config(values), tiny_clip, raw, (IMAGE, TEXT))


def test_battery_fails_a_strategy_that_ignores_its_prompts() -> None:
    """The battery is not vacuous: a strategy whose prompts never reach the tower fails it."""
    from mllm_missing.strategies.map_prompts import MapPrompts

    class Ignoring(MapPrompts):
        def prompts(self, modality: Modality, presence: torch.Tensor) -> Any:
            return None

    cfg = config({"method": "map_prompts", "prompt_length": 2})
    original = type(cfg).module
    type(cfg).module = f"{__name__}:_IGNORING"
    globals()["_IGNORING"] = Ignoring
    try:
        with pytest.raises(AssertionError, match="do not depend on its parameters"):
            check_strategy(cfg, tiny_llama, {TEXT: TEXTS}, (IMAGE, TEXT))
    finally:
        type(cfg).module = original
