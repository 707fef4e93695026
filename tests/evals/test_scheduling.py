"""`mllm-missing eval --scheduler`: per-pattern routing to candidate checkpoints, on MM-IMDb
fixtures with tiny checkpoints and a tiny Llama as the LLM scheduler."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from evals.run import EvalConfig, run_eval
from mllm_missing.errors import ConfigError

pytest.importorskip("open_clip")

CANDIDATES = (("zero", "concat"), ("zero", "late"))


def tiny_backbone(*_: Any, **__: Any) -> Any:
    from mllm_missing.strategies.testing import tiny_clip

    return tiny_clip(seed=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, fx: ModuleType) -> dict[str, Any]:
    from mllm_missing.training.config import TrainConfig
    from mllm_missing.training.supervised import run_training

    base = tmp_path_factory.mktemp("sched")
    cache = base / "cache"
    root = fx.write_mmimdb(base / "mmimdb")
    runs = {}
    for imputation, fusion in CANDIDATES:
        output = base / f"{imputation}_{fusion}"
        config = TrainConfig(
            dataset="mmimdb", data_root=str(root), backbone="clip-vit-b-16", device="cpu",
            hidden_size=16, epochs=2, batch_size=4, lr=0.01, imputation=imputation,
            fusion=fusion, test_missing=("both:0.7",), output_dir=str(output),
            cache_dir=str(cache), log="none",
        )  # fmt: skip
        run_training(config, backbone=tiny_backbone())
        runs[f"{imputation}+{fusion}"] = output
    return {"root": root, "cache": cache, "runs": runs}


@pytest.fixture(scope="module")
def tiny_lm() -> Any:
    from transformers import LlamaForCausalLM

    from mllm_missing.backbones.hf import FrozenCausalLM
    from mllm_missing.backbones.testing import tiny_llama_config, tiny_tokenizer

    tokenizer = tiny_tokenizer(["zero concat late image text missing present"] * 20)
    torch.manual_seed(0)
    return FrozenCausalLM(LlamaForCausalLM(tiny_llama_config(len(tokenizer))), tokenizer, "tiny")


def config(data: dict[str, Any], out: Path, **changes: Any) -> EvalConfig:
    values: dict[str, Any] = {
        "task": "mmimdb",
        "checkpoints": tuple(f"{name}={path}" for name, path in data["runs"].items()),
        "data_root": str(data["root"]),
        "missing": ("both:0.7",),
        "output_dir": str(out),
        "cache_dir": str(data["cache"]),
        "bootstrap": 20,
        "device": "cpu",
    }
    values.update(changes)
    return EvalConfig(**values)


def test_schedulers_route_patterns_to_the_chosen_checkpoint(
    data: dict[str, Any], tmp_path: Path, tiny_lm: Any
) -> None:
    settings = ("both:0.7", "text:0.7", "image:0.7")  # every pattern is scored
    val = run_eval(config(data, tmp_path / "val", split="dev", missing=settings),
                   backbone_factory=tiny_backbone)  # fmt: skip
    scores_path = tmp_path / "val" / "pattern_scores.json"
    scores = json.loads(scores_path.read_text())
    assert scores["split"] == "dev" and scores["metric"] == val["metric"] == "f1_macro"
    assert set(scores["scores"]) == {"zero+concat", "zero+late"}
    assert set(scores["scores"]["zero+late"]) == {"image", "image+text", "text"}

    test = config(data, tmp_path / "test", schedulers=("fixed,rule", "llm"),
                  validation_scores=str(scores_path), fixed="zero+late")  # fmt: skip
    results = run_eval(test, backbone_factory=tiny_backbone, scheduler_llm=tiny_lm)
    rows = {(r["method"], r["missing_rate"]): r for r in results["rows"]}
    methods = {m for m, _ in rows}
    assert methods == {"zero+concat", "zero+late", "scheduler-fixed", "scheduler-rule",
                       "scheduler-llm"}  # fmt: skip
    for rate in (0.0, 0.7):  # fixed = its checkpoint alone, exactly
        assert rows["scheduler-fixed", rate]["metrics"] == rows["zero+late", rate]["metrics"]
    decisions = results["schedulers"]
    for pattern, decision in decisions["rule"]["decisions"].items():
        by_option = {o: s[pattern] for o, s in scores["scores"].items()}
        assert decision["option"] == max(by_option, key=lambda o: by_option[o])
        # the routed row scores that pattern exactly as the chosen checkpoint does
        routed = rows["scheduler-rule", 0.7]["patterns"][pattern]
        assert routed == rows[decision["option"], 0.7]["patterns"][pattern]
    llm = decisions["llm"]
    assert set(llm["decisions"]) == {"image", "image+text", "text"} and llm["llm_calls"] == 3
    assert all(d["option"] in ("zero+concat", "zero+late") for d in llm["decisions"].values())
    markdown = results["markdown"]
    assert "## Schedulers: the checkpoint chosen per presence pattern" in markdown
    assert "| scheduler-llm | missing-both 70%" in markdown
    assert "| rule | text | " in markdown and "llm: 3 LLM call(s)" in markdown

    # A rerun reuses every candidate row (their logits are kept) and recomputes the schedulers.
    again = run_eval(test, backbone_factory=tiny_backbone, scheduler_llm=tiny_lm)
    assert again["timing"]["reused"] == 4 and again["rows"] == results["rows"]


def test_scheduler_settings_are_checked(data: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="scheduler must be one of fixed, llm, rule; got 'best'"):
        config(data, tmp_path, schedulers=("rule,best",))
    with pytest.raises(ConfigError, match="validation_scores: no such file"):
        config(data, tmp_path, schedulers=("rule",), validation_scores=str(tmp_path / "no.json"))
    with pytest.raises(ConfigError, match="validation split is 'dev'; pass --split dev"):
        run_eval(config(data, tmp_path / "v", split="val"), backbone_factory=tiny_backbone)
    twice = (f"a={data['runs']['zero+concat']}", f"b={data['runs']['zero+concat']}")
    with pytest.raises(ConfigError, match=r"checkpoints a and b are both zero\+concat"):
        run_eval(config(data, tmp_path / "d", checkpoints=twice, schedulers=("fixed",)),
                 backbone_factory=tiny_backbone)  # fmt: skip
    with pytest.raises(ConfigError, match="no validation score for pattern"):
        run_eval(config(data, tmp_path / "r", schedulers=("rule",)),
                 backbone_factory=tiny_backbone)  # fmt: skip


def test_hold_out_is_trainings_validation_split() -> None:
    from datasets import Dataset

    from mllm_missing.training.config import TrainConfig
    from mllm_missing.training.supervised import _splits, hold_out

    train = Dataset.from_dict({"id": [str(i) for i in range(50)]})
    config = TrainConfig(dataset="easy_vqa", seed=3, val_fraction=0.2)
    splits = _splits(config, lambda split: train if split == "train" else train.select([0]))
    rest, held = hold_out(train, 3, 0.2)
    assert held["id"] == splits["val"]["id"] and rest["id"] == splits["train"]["id"]
    assert len(held) == 10 and not set(held["id"]) & set(rest["id"])
