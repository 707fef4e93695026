"""Supervised training of a strategy + head on a task split: what `mllm-missing train` runs."""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mllm_missing.atomic import atomic_write_text
from mllm_missing.data.base import TaskInfo, TaskType
from mllm_missing.heads import task_loss
from mllm_missing.metrics import bootstrap_ci, compute_metrics
from mllm_missing.missing import MissingConfig, MissingType
from mllm_missing.model import MissingModalityModel, build_model
from mllm_missing.training.config import TrainConfig
from mllm_missing.training.data import SplitData, embed_rows, exclusion_groups, load_split
from mllm_missing.types import MODALITY_ORDER

__all__ = [
    "SupervisedTask",
    "evaluate_missing",
    "feature_cache_tag",
    "load_backbone",
    "predict",
    "resolve_device",
    "run_training",
    "score",
    "score_interval",
    "training_settings",
]

logger = logging.getLogger(__name__)


def _load_task(config: TrainConfig) -> tuple[TaskInfo, Any]:
    """The task info and a ``split -> dataset`` loader for the config's dataset."""
    if config.dataset == "easy_vqa":
        from mllm_missing.data.easy_vqa import TASK, load_easy_vqa

        def load(split: str) -> Any:
            return load_easy_vqa(split=split, cache_dir=config.cache_dir)

        return TASK, load
    if config.dataset == "mmimdb":
        from mllm_missing.data.mmimdb import TASK as MMIMDB
        from mllm_missing.data.mmimdb import load_mmimdb

        root, mode = str(config.data_root), config.text_mode
        return MMIMDB, lambda s: load_mmimdb(root, s, text_mode=mode, cache_dir=config.cache_dir)
    from mllm_missing.data.hateful_memes import TASK as MEMES
    from mllm_missing.data.hateful_memes import load_hateful_memes

    root = str(config.data_root)
    return MEMES, lambda s: load_hateful_memes(root, s, cache_dir=config.cache_dir)


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when present), ``cpu`` or ``cuda[:N]`` as a torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_backbone(
    name: str,
    *,
    weights: str | None,
    image_size: int,
    device: torch.device,
    quantization: str = "none",
) -> Any:
    """The frozen backbone of preset `name` on `device` (the offline default at `image_size`,
    a transformers LLM quantized with bitsandbytes when `quantization` is not ``none``)."""
    from mllm_missing.backbones.presets import get_backbone, get_preset

    options: dict[str, Any] = {"device": device}
    if get_preset(name).family == "offline_default":
        options["image_size"] = image_size
    if quantization != "none":
        options["quantization"] = quantization
    return get_backbone(name, weights=weights, **options)


def _limit(dataset: Any, limit: int | None) -> Any:
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset


def hold_out(train: Any, seed: int, fraction: float) -> tuple[Any, Any]:
    """Split a seeded share `fraction` off `train`: (the rest, the held-out part), both in
    their original order. The validation split of datasets that have none (easy-VQA); the eval
    runner's ``--split val`` rebuilds the same one from a checkpoint's training seed."""
    order = np.random.default_rng(seed).permutation(len(train))
    count = max(1, round(fraction * len(train)))
    rest = train.select(sorted(order[count:].tolist()))
    return rest, train.select(sorted(order[:count].tolist()))


def _splits(config: TrainConfig, load: Any) -> dict[str, Any]:
    """train / val / test datasets; without a validation split, a seeded share of train."""
    train = load(config.train_split)
    if config.val_split is None:
        train, val = hold_out(train, config.seed, config.val_fraction)
    else:
        val = load(config.val_split)
    return {
        "train": _limit(train, config.limit_train),
        "val": _limit(val, config.limit_val),
        "test": _limit(load(config.test_split), config.limit_test),
    }


class SupervisedTask:
    """A `TrainTask` for the training loop: a model, a training and a validation split."""

    def __init__(
        self, model: MissingModalityModel, task: TaskInfo, train: SplitData, val: SplitData
    ) -> None:
        self.model = model
        self.task = task
        self.train = train
        self.val = val
        self.metric = task.metric
        self.higher_is_better = True
        self.num_train = len(train)

    def trainable_module(self) -> torch.nn.Module:
        """The strategy + classifier."""
        return self.model

    def frozen_parameter_count(self) -> int:
        """Parameters of the frozen backbone."""
        own = {id(p) for p in self.model.parameters()}
        return sum(p.numel() for p in self.model.backbone.parameters() if id(p) not in own)  # type: ignore[attr-defined]

    def loss(self, rows: torch.Tensor) -> torch.Tensor:
        """Task loss (plus the imputation's own loss, if any) on training rows."""
        self.model.train()
        embeddings = embed_rows(self.model, self.train, rows)
        presence = self.train.presence[rows].to(next(iter(embeddings.values())).device)
        logits = self.model(embeddings, presence, exclusion_groups(self.train, rows))
        loss = task_loss(self.task.task_type, logits, self.train.labels[rows].to(logits.device))
        zeroed = {
            m: x * presence[:, MODALITY_ORDER.index(m)].unsqueeze(1) for m, x in embeddings.items()
        }
        auxiliary = self.model.classifier.imputation.auxiliary_loss(zeroed, presence)
        if auxiliary is not None:
            loss = loss + self.model.classifier.imputation.config.auxiliary_weight * auxiliary
        return loss

    def evaluate(self) -> dict[str, float]:
        """Metrics on the validation split."""
        return score(self.task, self.val.labels, predict(self.model, self.val))

    def save_pretrained(self, directory: Path) -> None:
        """Write the model's files into `directory`."""
        self.model.write_files(directory)


@torch.inference_mode()
def predict(model: MissingModalityModel, split: SplitData, batch_size: int = 1024) -> torch.Tensor:
    """Logits of every row of `split` (float, on the CPU)."""
    model.eval()
    outputs = []
    for rows in torch.arange(len(split)).split(batch_size):
        embeddings = embed_rows(model, split, rows)
        presence = split.presence[rows].to(next(iter(embeddings.values())).device)
        outputs.append(model(embeddings, presence, exclusion_groups(split, rows)).float().cpu())
    return torch.cat(outputs)


def score(task: TaskInfo, labels: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """The task's metrics from logits."""
    scores = logits.squeeze(-1) if task.task_type is TaskType.BINARY else logits
    return compute_metrics(task.task_type.value, labels.numpy(), scores.numpy(), from_logits=True)


def score_interval(
    task: TaskInfo, labels: torch.Tensor, logits: torch.Tensor, seed: int, n_resamples: int = 200
) -> list[float]:
    """95 % bootstrap interval (over samples) of the task's headline metric."""

    def metric(y: np.ndarray, s: np.ndarray) -> float:
        return score(task, torch.from_numpy(y), torch.from_numpy(s))[task.metric]

    low, high = bootstrap_ci(
        metric, labels.numpy(), logits.numpy(), n_resamples=n_resamples, seed=seed
    )
    return [low, high]


def feature_cache_tag(backbone: Any, image_size: int) -> str:
    """Names the backbone settings in feature-cache file names."""
    return f"{backbone.name}-{image_size}"


def evaluate_missing(
    model: MissingModalityModel,
    dataset: Any,
    split_name: str,
    task: TaskInfo,
    missing: MissingConfig,
    *,
    mask_root: Path,
    cache_dir: str | None,
    cache_tag: str,
    seed: int,
    n_resamples: int = 200,
    on_predictions: Callable[[SplitData, torch.Tensor], None] | None = None,
) -> dict[str, Any]:
    """Score `model` on one split under one missing setting (the seeded table under `mask_root`).

    The one evaluation path: `run_training` scores its test settings with it and the eval
    runner (`evals/run.py`) every (checkpoint, setting) pair. `on_predictions(split, logits)`
    sees the predictions before they are scored (the runner keeps them for its schedulers).

    Returns:
        ``missing`` (description), ``missing_type``, ``missing_rate``, ``metrics`` (every metric
        of the task) and ``ci95`` (bootstrap interval of the headline metric).
    """
    split = load_split(
        dataset, split_name, task, missing, model,
        mask_root=mask_root, cache_dir=cache_dir, cache_tag=cache_tag,
    )  # fmt: skip
    logits = predict(model, split)
    if on_predictions is not None:
        on_predictions(split, logits)
    return score_missing(task, missing, split.labels, logits, seed, n_resamples)


def score_missing(
    task: TaskInfo,
    missing: MissingConfig,
    labels: torch.Tensor,
    logits: torch.Tensor,
    seed: int,
    n_resamples: int = 200,
) -> dict[str, Any]:
    """The result row of `evaluate_missing` for predictions already made (the eval runner
    scores scheduler-routed predictions with it)."""
    return {
        "missing": missing.describe(),
        "missing_type": MissingType(missing.type).value,
        "missing_rate": missing.rate,
        "metrics": score(task, labels, logits),
        "ci95": score_interval(task, labels, logits, seed, n_resamples),
    }


def training_settings(config: TrainConfig) -> dict[str, Any]:
    """The training settings a checkpoint records (``model_config.json`` key ``training``), so
    an evaluation knows the train-time missing setting and rebuilds the same backbone inputs."""
    return {
        "dataset": config.dataset,
        "train_missing": config.train_missing,
        "seed": config.seed,
        "val_fraction": config.val_fraction,
        "image_size": config.image_size,
        "text_mode": config.text_mode,
        "backbone_weights": config.backbone_weights,
        "quantization": config.quantization,
    }


def run_training(
    config: TrainConfig, *, resume: bool = False, backbone: Any = None
) -> dict[str, Any]:
    """Train, keep the best validation checkpoint, score it on the test split, write results.json.

    Args:
        config: the run's settings.
        resume: continue from the last checkpoint in ``output_dir``.
        backbone: an already built frozen backbone used instead of the preset's (tests pass
            tiny ones built from configs); the preset name is still what the checkpoint records.

    Returns:
        The results written to ``output_dir/results.json``.
    """
    from mllm_missing.training.trainer import LoopConfig, fit

    started = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    output = Path(config.output_dir)
    task, load = _load_task(config)
    datasets = _splits(config, load)
    device = resolve_device(config.device)
    if backbone is None:
        backbone = load_backbone(
            config.backbone, weights=config.backbone_weights, image_size=config.image_size,
            device=device, quantization=config.quantization,
        )  # fmt: skip
    dims = {m: backbone.embed_dim(m) for m in task.modalities}
    spec = {
        "backbone": config.backbone,
        "strategy": config.strategy,
        "imputation": config.imputation,
        "fusion": config.fusion,
        "hidden_size": config.hidden_size,
        "routed_head": config.routed_head,
        "task": task.name,
        "task_type": task.task_type.value,
        "num_labels": task.num_labels,
        "label_names": list(task.label_names),
        "modalities": [m.value for m in task.modalities],
        "training": training_settings(config),
    }
    model = build_model(spec, backbone, dims).to(device)
    tag = feature_cache_tag(backbone, config.image_size)
    train_missing = MissingConfig.parse(config.train_missing, seed=config.seed)
    splits = {
        name: load_split(
            datasets[name], name, task, train_missing, model,
            mask_root=output / "masks", cache_dir=config.cache_dir, cache_tag=tag,
        )
        for name in ("train", "val")
    }  # fmt: skip
    train = splits["train"]
    model.classifier.imputation.fit(train.features, train.presence, groups=train.groups)
    if model.strategy.retrieves:
        model.strategy.fit_retrieval(
            train.frozen_embeddings(torch.arange(len(train))), train.presence, train.ids,
            groups=train.groups, labels=train.labels,
        )  # fmt: skip
    supervised = SupervisedTask(model, task, splits["train"], splits["val"])
    # The loop's settings are TrainConfig fields of the same names.
    names = [f.name for f in fields(LoopConfig) if f.name != "output_dir"]
    loop = LoopConfig(**{n: getattr(config, n) for n in names}, output_dir=str(output))
    result = fit(supervised, loop, resume=resume)
    # The best weights go into the model already on the backbone (a LoRA cannot be injected twice).
    model.load_weights(output / "best")
    rows = []
    for setting in config.test_missing:
        missing = MissingConfig.parse(setting, seed=config.seed)
        row = evaluate_missing(
            model, datasets["test"], "test", task, missing,
            mask_root=output / "masks", cache_dir=config.cache_dir, cache_tag=tag, seed=config.seed,
        )  # fmt: skip
        rows.append(row)
        value = row["metrics"][task.metric]
        logger.info("test %s: %s %.4f", missing.describe(), task.metric, value)
    results = {
        "task": task.name,
        "metric": task.metric,
        "config": asdict(config),
        "strategy": model.strategy.config.to_dict(),
        "samples": {k: len(v) for k, v in datasets.items()},
        "trainable_parameters": result.trainable_parameters,
        "frozen_parameters": result.frozen_parameters,
        "best_epoch": result.best_epoch,
        "best_val": result.best_metric,
        "history": result.history,
        "test": rows,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "seconds": time.perf_counter() - started,
    }
    atomic_write_text(output / "results.json", json.dumps(results, indent=2, default=str))
    return results
