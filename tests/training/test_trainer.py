"""Tests of the training loop on a tiny synthetic task: resume, accumulation, best, refusals."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from mllm_missing.errors import ConfigError
from mllm_missing.training.trainer import LoopConfig, fit


class Toy:
    """A 2-layer MLP with dropout on random data (dropout makes RNG restoration matter)."""

    metric = "accuracy"
    higher_is_better = True

    def __init__(self, dropout: float = 0.2, n: int = 96) -> None:
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 6, generator=generator)
        self.y = (self.x[:, 0] > 0).long()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 2))
        self.num_train = n
        self.saved: list[Path] = []

    def trainable_module(self) -> nn.Module:
        return self.net

    def loss(self, rows: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.net(self.x[rows]), self.y[rows])

    def evaluate(self) -> dict[str, float]:
        self.net.eval()
        with torch.no_grad():
            value = float((self.net(self.x).argmax(-1) == self.y).float().mean())
        self.net.train()
        return {"accuracy": value}

    def save_pretrained(self, directory: Path) -> None:
        torch.save(self.net.state_dict(), directory / "net.pt")


def loop(tmp_path: Path, **changes: object) -> LoopConfig:
    base = LoopConfig(
        epochs=3, batch_size=16, lr=0.01, output_dir=str(tmp_path), checkpoint_every=2
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_resume_mid_epoch_is_bit_identical(tmp_path: Path) -> None:
    full = Toy()
    reference = fit(full, loop(tmp_path / "full"))
    interrupted = Toy()
    # 6 batches per epoch: stop after 9 steps, i.e. in the middle of epoch 2.
    first = fit(interrupted, loop(tmp_path / "cut"), stop_after_steps=9)
    assert first.stopped_early
    resumed_task = Toy()  # a fresh process: new model, state comes from the checkpoint only
    resumed = fit(resumed_task, loop(tmp_path / "cut"), resume=True)
    for a, b in zip(full.net.parameters(), resumed_task.net.parameters()):
        assert torch.equal(a, b)
    assert resumed.history == reference.history
    with (tmp_path / "cut" / "log.csv").open() as handle:
        keys = [(r["step"], r["split"]) for r in csv.DictReader(handle)]
    assert len(keys) == len(set(keys)), "resume duplicated log rows"


def test_gradient_accumulation_matches_a_larger_batch(tmp_path: Path) -> None:
    small, large = Toy(dropout=0.0), Toy(dropout=0.0)
    fit(small, loop(tmp_path / "a", epochs=1, batch_size=16, grad_accum=2, checkpoint_every=0))
    fit(large, loop(tmp_path / "b", epochs=1, batch_size=32, grad_accum=1, checkpoint_every=0))
    for a, b in zip(small.net.parameters(), large.net.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_best_checkpoint_and_result(tmp_path: Path) -> None:
    task = Toy()
    result = fit(task, loop(tmp_path))
    assert (tmp_path / "best" / "net.pt").is_file() and (tmp_path / "best" / "best.json").is_file()
    assert result.best_metric == max(h["accuracy"] for h in result.history)
    assert result.trainable_parameters == sum(p.numel() for p in task.net.parameters())
    assert (tmp_path / "train_result.json").is_file()


def test_refuses_to_overwrite_or_resume_with_other_settings(tmp_path: Path) -> None:
    fit(Toy(), loop(tmp_path), stop_after_steps=3)
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        fit(Toy(), loop(tmp_path))
    with pytest.raises(ConfigError, match="lr differ"):
        fit(Toy(), loop(tmp_path, lr=0.5), resume=True)


def test_failed_save_keeps_the_previous_best(tmp_path: Path) -> None:
    task = Toy()
    assert fit(task, loop(tmp_path, epochs=2), stop_after_steps=6).stopped_early  # after epoch 1
    before = (tmp_path / "best" / "net.pt").read_bytes()

    class Broken(Toy):
        def evaluate(self) -> dict[str, float]:
            return {"accuracy": 2.0}  # always "better"

        def save_pretrained(self, directory: Path) -> None:
            (directory / "net.pt").write_bytes(b"partial")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        fit(Broken(), loop(tmp_path, epochs=2), resume=True)
    assert (tmp_path / "best" / "net.pt").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".best")]


@pytest.mark.parametrize(
    "field,value,message",
    [("grad_accum", 0, "grad_accum must be >= 1"), ("log", "wandb", "log must be one of"),
     ("mixed_precision", "fp8", "mixed_precision must be one of"),
     ("warmup_ratio", 1.0, "warmup_ratio must be in")],
)  # fmt: skip
def test_config_checks(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LoopConfig(**{field: value})  # type: ignore[arg-type]


def test_resumed_log_has_every_step_once(tmp_path: Path) -> None:
    fit(Toy(), loop(tmp_path), stop_after_steps=9)  # mid-epoch checkpoint at step 9
    fit(Toy(), loop(tmp_path), resume=True)
    with (tmp_path / "log.csv").open() as handle:
        steps = [int(r["step"]) for r in csv.DictReader(handle) if r["split"] == "train"]
    assert steps == list(range(1, 19))
