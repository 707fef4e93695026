"""The training loop shared by recipes, on `accelerate`: seeded, resumable, atomic checkpoints.

The row order of epoch ``e`` is a permutation seeded by ``(seed, e)``, so a resumed run
regenerates it; a checkpoint stores the trainable state, optimizer, scheduler, every RNG state
and the position in the epoch, so an interrupted run resumed with the same seed ends with the
same parameters as an uninterrupted one (bit-identical on CPU).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mllm_missing.atomic import atomic_directory, atomic_write, atomic_write_text
from mllm_missing.errors import ConfigError, DataFormatError

__all__ = ["LoopConfig", "TrainResult", "TrainTask", "fit"]

logger = logging.getLogger(__name__)
_MATH_FIELDS = (
    "epochs", "batch_size", "lr", "weight_decay", "warmup_ratio", "grad_accum", "max_grad_norm",
    "seed", "mixed_precision",
)  # fmt: skip


@dataclass
class LoopConfig:
    """Settings of `fit` (see `TrainConfig` for their meaning)."""

    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    grad_accum: int = 1
    max_grad_norm: float = 0.0
    mixed_precision: str = "no"
    seed: int = 0
    checkpoint_every: int = 0
    log: str = "csv"
    output_dir: str = "runs/train"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"loop.{name} must be >= 1; got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"loop.lr must be positive; got {self.lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"loop.warmup_ratio must be in [0, 1); got {self.warmup_ratio}")
        if self.checkpoint_every < 0 or self.max_grad_norm < 0 or self.weight_decay < 0:
            raise ConfigError("loop.checkpoint_every, max_grad_norm and weight_decay must be >= 0")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(
                f"loop.mixed_precision must be one of no, bf16, fp16; got {self.mixed_precision!r}"
            )
        if self.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("loop.mixed_precision fp16 needs a CUDA GPU; use bf16 or no")
        if self.log not in ("csv", "tensorboard", "both", "none"):
            raise ConfigError(
                f"loop.log must be one of csv, tensorboard, both, none; got {self.log!r}"
            )


class TrainTask(Protocol):
    """What `fit` trains: rows 0..num_train-1 of a training split and a validation metric."""

    metric: str
    higher_is_better: bool
    num_train: int

    def trainable_module(self) -> nn.Module: ...
    def loss(self, rows: torch.Tensor) -> torch.Tensor: ...
    def evaluate(self) -> dict[str, float]: ...
    def save_pretrained(self, directory: Path) -> None: ...


@dataclass
class TrainResult:
    """What a `fit` call did."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_metric: float | None = None
    best_epoch: int | None = None
    trainable_parameters: int = 0
    frozen_parameters: int = 0
    steps: int = 0
    seconds: float = 0.0
    stopped_early: bool = False


def _trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    state = module.state_dict()
    return {k: v.detach().cpu().contiguous() for k, v in state.items() if k in names}


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _schedule(total: int, warmup_ratio: float) -> Any:
    warmup = int(total * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


class _Logs:
    """CSV (and optionally TensorBoard) logs; rows after `from_step` are dropped on resume."""

    def __init__(self, output: Path, kind: str, from_step: int) -> None:
        self.path = output / "log.csv"
        self.kind = kind
        self.writer: Any = None
        if kind in ("tensorboard", "both"):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                from mllm_missing.errors import MissingDependencyError

                raise MissingDependencyError(
                    "log: tensorboard is not installed; pip install tensorboard"
                ) from exc
            self.writer = SummaryWriter(str(output / "tensorboard"))
        # Rows live in memory; each add rewrites the file atomically from them (no re-read).
        self.rows: list[dict[str, Any]] = []
        if kind in ("csv", "both") and self.path.is_file():
            with self.path.open(encoding="utf-8") as handle:
                # Every row up to the checkpoint's step was logged before it was written.
                self.rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= from_step]
            self._write_csv()

    def _write_csv(self) -> None:
        columns: list[str] = []
        for row in self.rows:
            columns += [k for k in row if k not in columns]

        def write(path: Path) -> None:
            with path.open("w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns)
                writer.writeheader()
                writer.writerows(self.rows)

        atomic_write(self.path, write)

    def add(self, row: dict[str, Any]) -> None:
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, float) and key not in ("epoch", "step"):
                    self.writer.add_scalar(f"{row['split']}/{key}", value, row["step"])
        if self.kind in ("csv", "both"):
            self.rows.append(row)
            self._write_csv()


def fit(
    task: TrainTask,
    config: LoopConfig,
    *,
    resume: bool = False,
    stop_after_steps: int | None = None,
) -> TrainResult:
    """Train `task`; keep the best validation state in ``output_dir/best``.

    Args:
        task: what to train.
        config: the loop settings.
        resume: continue from ``output_dir/checkpoints/last`` if it exists.
        stop_after_steps: stop (after a checkpoint) once this call has made that many optimizer
            steps; simulates an interruption.
    """
    from accelerate import Accelerator
    from safetensors.torch import load_file, save_file

    started = time.perf_counter()
    output = Path(config.output_dir)
    last = output / "checkpoints" / "last"
    if last.exists() and not resume:
        raise ConfigError(
            f"{output} already holds a checkpoint; pass --resume to continue it or choose "
            "another output_dir (nothing there is overwritten)"
        )
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    random.seed(config.seed)
    module = task.trainable_module()
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters")
    result = TrainResult(trainable_parameters=sum(p.numel() for p in params))
    frozen_count = getattr(task, "frozen_parameter_count", None)
    result.frozen_parameters = int(frozen_count()) if callable(frozen_count) else 0
    share = 100.0 * result.trainable_parameters / max(result.frozen_parameters, 1)
    logger.info(
        "trainable parameters: %s (%.3f %% of the %s frozen backbone parameters)",
        f"{result.trainable_parameters:,}", share, f"{result.frozen_parameters:,}",
    )  # fmt: skip
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.grad_accum,
        cpu=not torch.cuda.is_available(),
    )
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    batches = -(-task.num_train // config.batch_size)
    total = config.epochs * -(-batches // config.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total, config.warmup_ratio))
    # Only the optimizer is prepared: the task owns its model and moves its own batches.
    optimizer = accelerator.prepare_optimizer(optimizer)
    epoch, done, step, running = 0, 0, 0, 0.0
    best: float | None = None
    if resume and last.exists():
        meta_path = last / "state.json"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            module.load_state_dict(load_file(str(last / "trainable.safetensors")), strict=False)
            extra = torch.load(last / "optimizer.pt", weights_only=False)
        except (OSError, ValueError, RuntimeError) as exc:
            raise DataFormatError(f"{last}: unreadable checkpoint ({exc})") from None
        changed = [k for k in _MATH_FIELDS if meta["config"].get(k) != getattr(config, k)]
        if changed:
            raise ConfigError(
                f"{last} was written with other settings: {', '.join(changed)} differ; "
                "resume with the same settings or use another output_dir"
            )
        optimizer.load_state_dict(extra["optimizer"])
        scheduler.load_state_dict(extra["scheduler"])
        _set_rng_state(extra["rng"])
        epoch, done, step = meta["epoch"], meta["batches_done"], meta["step"]
        running = float(meta.get("running_loss", 0.0))
        best, result.best_epoch, result.history = meta["best"], meta["best_epoch"], meta["history"]
        logger.info("resuming at epoch %d, batch %d (step %d)", epoch + 1, done, step)
    elif resume:
        logger.info("no checkpoint in %s; starting fresh", output)
    logs = _Logs(output, config.log, step)

    def checkpoint() -> None:
        with atomic_directory(last) as folder:
            save_file(_trainable_state(module), str(folder / "trainable.safetensors"))
            torch.save(
                {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": _rng_state()},
                folder / "optimizer.pt",
            )  # fmt: skip
            meta = {"epoch": epoch, "batches_done": done, "step": step, "best": best,
                    "best_epoch": result.best_epoch, "history": result.history,
                    "running_loss": running, "config": asdict(config)}  # fmt: skip
            (folder / "state.json").write_text(json.dumps(meta, default=str), encoding="utf-8")

    calls = 0
    while epoch < config.epochs:
        order = torch.randperm(
            task.num_train, generator=torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        )
        chunks = order.split(config.batch_size)
        module.train()
        progress = tqdm(total=len(chunks), initial=done, desc=f"epoch {epoch + 1}/{config.epochs}")
        while done < len(chunks):
            rows = chunks[done]
            with accelerator.accumulate(module):
                with accelerator.autocast():
                    loss = task.loss(rows)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            done += 1
            running += float(loss.detach())
            progress.update(1)
            boundary = done % config.grad_accum == 0 or done == len(chunks)
            if not boundary:
                continue
            scheduler.step()
            step += 1
            calls += 1
            row = {"epoch": epoch, "step": step, "split": "train", "loss": float(loss.detach()),
                   "lr": scheduler.get_last_lr()[0]}  # fmt: skip
            logs.add(row)
            stop = stop_after_steps is not None and calls >= stop_after_steps
            if done < len(chunks) and (
                stop or (config.checkpoint_every and step % config.checkpoint_every == 0)
            ):
                checkpoint()
            if stop and done < len(chunks):
                progress.close()
                result.stopped_early = True
                result.steps, result.seconds = step, time.perf_counter() - started
                return result
        progress.close()
        metrics = task.evaluate()
        if task.metric not in metrics:
            raise ConfigError(f"evaluate() returned no {task.metric!r}; got {sorted(metrics)}")
        value = float(metrics[task.metric])
        entry = {"epoch": epoch + 1, "step": step, "train_loss": running / max(len(chunks), 1),
                 **{k: float(v) for k, v in metrics.items()}}  # fmt: skip
        result.history.append(entry)
        logs.add({"epoch": epoch, "step": step, "split": "val", **entry})
        logger.info("epoch %d: val %s %.4f", epoch + 1, task.metric, value)
        better = best is None or (value > best if task.higher_is_better else value < best)
        if better:
            best, result.best_epoch = value, epoch + 1
            with atomic_directory(output / "best") as folder:
                task.save_pretrained(folder)
                (folder / "best.json").write_text(json.dumps(entry), encoding="utf-8")
        epoch, done, running = epoch + 1, 0, 0.0
        checkpoint()
        if stop_after_steps is not None and calls >= stop_after_steps and epoch < config.epochs:
            result.stopped_early = True
            break
    result.best_metric, result.steps = best, step
    result.seconds = time.perf_counter() - started
    atomic_write_text(output / "train_result.json", json.dumps(asdict(result), indent=2))
    return result
