"""Every shipped recipe config parses; `mllm-missing train` trains, saves, reloads and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mllm_missing.config import load_config
from mllm_missing.errors import ConfigError
from mllm_missing.quickstart import QuickstartConfig
from mllm_missing.training.config import TrainConfig, load_train_config

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "configs"
# The projector VLM recipe has its own config class (tests/training/test_vlm_training.py parses it).
TRAIN_CONFIGS = sorted(
    p
    for p in RECIPES.glob("*/*.yaml")
    if p.name != "offline_heads.yaml" and not p.name.endswith("_projector.yaml")
)


def test_every_dataset_has_recipes() -> None:
    names = {p.relative_to(RECIPES).as_posix() for p in TRAIN_CONFIGS}
    for dataset in ("mmimdb", "hateful_memes"):
        for method in ("map_prompts", "modality_prompts", "correlated_prompts", "lora"):
            assert f"{dataset}/clip-vit-b-16_{method}.yaml" in names
    assert "easy_vqa/offline-default_map_prompts.yaml" in names


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.relative_to(RECIPES).as_posix())
def test_recipe_parses(path: Path) -> None:
    config = load_train_config(path)
    assert isinstance(config, TrainConfig)
    assert config.output_dir.endswith(path.stem)
    assert config.dataset == path.parent.name


def test_heads_recipe_parses() -> None:
    load_config(QuickstartConfig, RECIPES / "easy_vqa" / "offline_heads.yaml")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["epoch=3"], "unknown key 'epoch'; allowed:"),
        (["strategy.prompt_lenght=3"], "unknown key 'prompt_lenght'"),
        (["strategy.method=prefix"], "strategy.method must be one of"),
        (["strategy.prompt_type=deep"], "prompt_type must be one of input, attention"),
        (["mixed_precision=fp8"], "mixed_precision must be one of no, bf16, fp16"),
        (["train_missing=both:1.5"], "rate"),
        (["batch_size=0"], "batch_size must be >= 1"),
        (["dataset=coco"], "dataset must be one of easy_vqa, mmimdb, hateful_memes"),
        (["backbone=clip-vit-z"], "unknown backbone preset"),
    ],
)
def test_bad_keys_and_values_fail_before_work(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_train_config(RECIPES / "easy_vqa" / "offline-default_map_prompts.yaml", overrides)


def test_strategy_overrides_merge_into_the_file_strategy() -> None:
    path = RECIPES / "easy_vqa" / "offline-default_map_prompts.yaml"
    config = load_train_config(path, ["strategy.prompt_length=3"])
    assert config.strategy["method"] == "map_prompts" and config.strategy["prompt_length"] == 3


def test_mmimdb_needs_a_data_root() -> None:
    with pytest.raises(ConfigError, match="data_root"):
        TrainConfig(dataset="mmimdb")


@pytest.mark.slow
def test_train_saves_reloads_and_resumes(tmp_path: Path) -> None:
    from mllm_missing.cli import main
    from mllm_missing.model import MissingModalityModel
    from mllm_missing.training.supervised import predict

    out = tmp_path / "run"
    args = [
        "train", str(RECIPES / "easy_vqa" / "offline-default_map_prompts.yaml"),
        "limit_train=600", "limit_val=200", "limit_test=300", "epochs=2", "batch_size=200",
        "strategy.prompt_length=2", f"output_dir={out}", "checkpoint_every=1",
    ]  # fmt: skip
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["strategy"]["method"] == "map_prompts"
    assert 0 < results["trainable_parameters"] < results["frozen_parameters"]
    assert {"model_config.json", "head.safetensors", "strategy.safetensors"} <= {
        p.name for p in (out / "best").iterdir()
    }
    assert len(results["history"]) == 2 and len(results["test"]) == 2
    # Without --resume an existing run is refused (nothing is overwritten).
    assert main(args) == 2
    # Resuming a finished run trains nothing more and scores the same best model.
    assert main([*args, "--resume"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["test"] == results["test"]
    reloaded = MissingModalityModel.from_pretrained(out / "best")
    assert reloaded.strategy.config.to_dict() == results["strategy"]
    first = reloaded.strategy.state_dict()
    assert all(torch.isfinite(v).all() for v in first.values())
    del predict


EASY_VQA = sorted((RECIPES / "easy_vqa").glob("offline-default_*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("path", EASY_VQA, ids=lambda p: p.stem)
def test_every_easy_vqa_recipe_trains(path: Path, tmp_path: Path) -> None:
    from mllm_missing.training.supervised import run_training

    overrides = ["limit_train=300", "limit_val=100", "limit_test=100", "epochs=1",
                 f"output_dir={tmp_path}"]  # fmt: skip
    results = run_training(load_train_config(path, overrides))
    assert results["strategy"]["method"] == load_train_config(path).strategy["method"]
    assert all(0.0 <= row["metrics"]["accuracy"] <= 1.0 for row in results["test"])
