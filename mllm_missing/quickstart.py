"""The main job on the offline default: easy-VQA under missing modalities, end to end on a CPU.

Frozen EfficientNet-Lite0 and all-MiniLM-L6-v2 encode each distinct image and question once
(cached on disk); small heads are trained on the embeddings with 70 % of training samples missing
a modality (missing-both), once per way of handling absence; every head is then evaluated on the
test split at several missing rates and types, all from the same seeded mask tables.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mllm_missing.backbones.features import encode_column
from mllm_missing.backbones.offline import load_default_image_encoder, load_default_text_encoder
from mllm_missing.data.base import cache_root
from mllm_missing.data.easy_vqa import TASK, load_easy_vqa
from mllm_missing.errors import ConfigError
from mllm_missing.heads import (
    ClassificationHead,
    EmbeddingClassifier,
    PatternRoutedHead,
    impute_once,
    task_loss,
)
from mllm_missing.metrics import accuracy, bootstrap_ci
from mllm_missing.missing import MissingConfig, MissingType, get_mask_table
from mllm_missing.report import write_results
from mllm_missing.strategies.fusion import FUSIONS, FusionConfig, build_fusion
from mllm_missing.strategies.imputation import IMPUTATIONS, ImputationConfig, build_imputation
from mllm_missing.types import MODALITY_ORDER, Modality

__all__ = ["QuickstartConfig", "run_quickstart"]

logger = logging.getLogger(__name__)
MODALITIES = (Modality.IMAGE, Modality.TEXT)


@dataclass(frozen=True)
class HandlingMethod:
    """One way of handling absent modalities in the quickstart.

    Attributes:
        imputation: imputation module filling absent embeddings (a name in `IMPUTATIONS`).
        routed: one head per presence pattern (missing-aware) instead of one shared head.
        description: one line for the README and results.json.
        fusion: fusion module (a name in `FUSIONS`).
    """

    imputation: str
    routed: bool
    description: str
    fusion: str = "concat"


#: Named ways of handling absence. Any ``IMPUTATION+FUSION`` pair (e.g. ``translator+gated``),
#: optionally with ``+routed``, is accepted too (see `resolve_method`).
METHODS: dict[str, HandlingMethod] = {
    "zero": HandlingMethod("zero", False, "absent embeddings zero-filled, one shared head"),
    "learned_token": HandlingMethod(
        "learned_token", False, "absent embeddings replaced by a learned token, one shared head"
    ),
    "missing_aware": HandlingMethod(
        "zero", True, "zero-filled, one head per presence pattern (missing-aware experts)"
    ),
}


def resolve_method(name: str) -> HandlingMethod:
    """The `HandlingMethod` of a preset name or of ``IMPUTATION+FUSION[+routed]``."""
    if name in METHODS:
        return METHODS[name]
    parts = name.split("+")
    routed = parts[-1] == "routed"
    if routed:
        parts = parts[:-1]
    if len(parts) != 2:
        raise ConfigError(
            f"methods: unknown method {name!r}; use one of {', '.join(METHODS)} or "
            f"IMPUTATION+FUSION[+routed] with imputation in {', '.join(IMPUTATIONS.names())} "
            f"and fusion in {', '.join(FUSIONS.names())}"
        )
    imputation, fusion = parts
    ImputationConfig(method=imputation)
    FusionConfig(method=fusion)
    head = "one head per presence pattern" if routed else "one shared head"
    return HandlingMethod(
        imputation, routed, f"{imputation} imputation, {fusion} fusion, {head}", fusion
    )


@dataclass
class QuickstartConfig:
    """Settings of the quickstart run.

    Args:
        train_missing: missing setting at train time, ``TYPE:RATE``.
        test_types: missing types evaluated.
        test_rates: missing rates evaluated for each type.
        methods: ways of handling absence compared (names in `METHODS`).
        epochs: training epochs per method.
        batch_size: training batch size.
        lr: AdamW learning rate.
        hidden_size: width of the fusion projections and of the head.
        image_size: resolution the image encoder sees (easy-VQA images are 64x64).
        seed: seed of the mask tables and of training.
        limit_train: use only the first N training questions (quick runs).
        limit_test: use only the first N test questions.
        output_dir: where results.json, results.md, the plot and mask tables go.
        cache_dir: cache root for datasets and features (default ~/.cache/mllm_missing).
        threads: torch CPU threads (0 keeps torch's default).
    """

    train_missing: str = "both:0.7"
    test_types: tuple[str, ...] = ("both", "text", "image")
    test_rates: tuple[float, ...] = (0.0, 0.3, 0.5, 0.7, 0.9)
    methods: tuple[str, ...] = ("zero", "learned_token", "missing_aware")
    epochs: int = 20
    batch_size: int = 256
    lr: float = 2e-3
    hidden_size: int = 256
    image_size: int = 128
    seed: int = 0
    limit_train: int | None = None
    limit_test: int | None = None
    output_dir: str = "runs/quickstart"
    cache_dir: str | None = None
    threads: int = 0

    def __post_init__(self) -> None:
        self.test_types = tuple(self.test_types)
        self.test_rates = tuple(float(r) for r in self.test_rates)
        self.methods = tuple(self.methods)
        MissingConfig.parse(self.train_missing)
        for kind in self.test_types:
            MissingConfig(type=kind, rate=0.0)
        for rate in self.test_rates:
            MissingConfig(rate=rate)
        for method in self.methods:
            resolve_method(method)
        for name in ("epochs", "batch_size", "hidden_size", "image_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive; got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive; got {self.lr}")


@dataclass
class _Split:
    ids: list[str]
    embeddings: dict[Modality, torch.Tensor]
    labels: torch.Tensor
    #: Per row, its image id: the questions about one image form a group, which a training
    #: row's knn stand-ins leave out (a test row's image is never among the training images).
    groups: list[str]


def _embed_split(split: str, config: QuickstartConfig, encoders: Mapping[str, Any]) -> _Split:
    limit = config.limit_train if split == "train" else config.limit_test
    dataset = load_easy_vqa(split=split, cache_dir=config.cache_dir, limit=limit)
    feature_dir = cache_root(config.cache_dir) / "features"
    image_encoder, text_encoder = encoders["image"], encoders["text"]
    images = encode_column(
        dataset,
        "image",
        image_encoder.encode,
        key_column="image_id",
        cache_path=feature_dir / f"{image_encoder.name}-{config.image_size}-easy_vqa-{split}.st",
        batch_size=64,
        desc=f"{split} images",
    )
    texts = encode_column(
        dataset,
        "text",
        text_encoder.encode,
        cache_path=feature_dir / f"{text_encoder.name}-easy_vqa-{split}.st",
        batch_size=128,
        desc=f"{split} questions",
    )
    columns = dataset.select_columns(["id", "image_id", "text", "label"])[:]
    image_ids = [str(i) for i in columns["image_id"]]
    return _Split(
        ids=list(columns["id"]),
        embeddings={
            Modality.IMAGE: images.lookup(image_ids),
            Modality.TEXT: texts.lookup(columns["text"]),
        },
        labels=torch.tensor(columns["label"], dtype=torch.long),
        groups=image_ids,
    )


def _masked(data: _Split, presence: torch.Tensor) -> dict[Modality, torch.Tensor]:
    """Embeddings with absent rows zeroed, so a missing input can never reach the model."""
    return {
        m: data.embeddings[m] * presence[:, MODALITY_ORDER.index(m)].unsqueeze(1)
        for m in MODALITIES
    }


def _presence(config: MissingConfig, split: str, data: _Split, root: Path) -> torch.Tensor:
    table = get_mask_table(config, "easy_vqa", split, data.ids, MODALITIES, root)
    return torch.from_numpy(table.presence_tensor_rows())


def _build_model(
    method: HandlingMethod, config: QuickstartConfig, dims: Mapping[Modality, int]
) -> EmbeddingClassifier:
    imputation = build_imputation(ImputationConfig(method=method.imputation), dims)
    fusion = build_fusion(FusionConfig(method=method.fusion, hidden_size=config.hidden_size), dims)
    head: ClassificationHead | PatternRoutedHead
    if method.routed:
        head = PatternRoutedHead(fusion.out_dim, TASK.num_labels, MODALITIES, config.hidden_size)
    else:
        head = ClassificationHead(fusion.out_dim, TASK.num_labels, config.hidden_size)
    return EmbeddingClassifier(imputation, fusion, head)


def _train(
    model: EmbeddingClassifier, data: _Split, presence: torch.Tensor, config: QuickstartConfig
) -> list[float]:
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    steps = config.epochs * -(-len(data.labels) // config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=steps)
    inputs = _masked(data, presence)
    model.imputation.fit(inputs, presence, groups=data.groups)
    # A fixed imputation over frozen features gives the same stand-ins every epoch: fill once.
    filled = impute_once(model.imputation, inputs, presence, exclude_groups=data.groups)
    losses = []
    model.train()
    for epoch in range(config.epochs):
        order = torch.randperm(len(data.labels), generator=generator)
        total = 0.0
        batches = order.split(config.batch_size)
        for rows in tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False):
            if filled is not None:
                batch = {m: x[rows] for m, x in filled.items()}
                logits = model(batch, presence[rows], imputed=True)
            else:
                logits = model({m: x[rows] for m, x in inputs.items()}, presence[rows])
            loss = task_loss(TASK.task_type, logits, data.labels[rows])
            auxiliary = model.imputation.auxiliary_loss(
                {m: x[rows] for m, x in inputs.items()}, presence[rows]
            )
            if auxiliary is not None:
                loss = loss + model.imputation.config.auxiliary_weight * auxiliary
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(rows)
        losses.append(total / len(data.labels))
    return losses


@torch.inference_mode()
def _predict(model: EmbeddingClassifier, data: _Split, presence: torch.Tensor) -> torch.Tensor:
    model.eval()
    inputs = _masked(data, presence)
    predictions = []
    filled = impute_once(model.imputation, inputs, presence)
    for rows in torch.arange(len(data.labels)).split(4096):
        if filled is not None:
            logits = model({m: x[rows] for m, x in filled.items()}, presence[rows], imputed=True)
        else:
            logits = model({m: x[rows] for m, x in inputs.items()}, presence[rows])
        predictions.append(logits.argmax(-1))
    return torch.cat(predictions)


def _score(labels: torch.Tensor, predictions: torch.Tensor, seed: int) -> dict[str, Any]:
    y_true, y_pred = labels.numpy(), predictions.numpy()
    low, high = bootstrap_ci(accuracy, y_true, y_pred, n_resamples=300, seed=seed)
    return {"value": accuracy(y_true, y_pred), "ci95": [low, high]}


def _test_settings(config: QuickstartConfig) -> list[MissingConfig]:
    settings = [MissingConfig(type=MissingType.BOTH, rate=0.0, seed=config.seed)]
    for kind in config.test_types:
        for rate in config.test_rates:
            if rate > 0:
                settings.append(MissingConfig(type=kind, rate=rate, seed=config.seed))
    # Single-modality rows: every test sample lacks one modality.
    settings += [MissingConfig(type=k, rate=1.0, seed=config.seed) for k in ("text", "image")]
    return settings


def run_quickstart(config: QuickstartConfig) -> dict[str, Any]:
    """Run the quickstart and write results.json, results.md and accuracy_vs_missing.png.

    Returns:
        The results dictionary that was written to results.json.
    """
    started = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    output = Path(config.output_dir)
    mask_root = output / "masks"
    logger.info("loading the frozen default encoders")
    encoders = {
        "image": load_default_image_encoder(image_size=config.image_size),
        "text": load_default_text_encoder(),
    }
    train, test = (_embed_split(s, config, encoders) for s in ("train", "test"))
    encode_seconds = time.perf_counter() - started
    dims = {m: int(train.embeddings[m].shape[1]) for m in MODALITIES}
    train_missing = MissingConfig.parse(config.train_missing, seed=config.seed)
    train_presence = _presence(train_missing, "train", train, mask_root)
    settings = _test_settings(config)
    test_presence = {s.slug: _presence(s, "test", test, mask_root) for s in settings}

    rows: list[dict[str, Any]] = []
    training: dict[str, Any] = {}
    for method in config.methods:
        torch.manual_seed(config.seed)
        model = _build_model(resolve_method(method), config, dims)
        t0 = time.perf_counter()
        losses = _train(model, train, train_presence, config)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        training[method] = {
            "description": resolve_method(method).description,
            "loss_per_epoch": losses,
            "seconds": time.perf_counter() - t0,
            "trainable_parameters": trainable,
        }
        for setting in settings:
            presence = test_presence[setting.slug]
            rows.append(
                {
                    "method": method,
                    "missing_type": MissingType(setting.type).value,
                    "missing_rate": setting.rate,
                    **_score(test.labels, _predict(model, test, presence), config.seed),
                }
            )
    results = {
        "task": TASK.name,
        "metric": TASK.metric,
        "config": asdict(config),
        "train_missing": asdict(train_missing),
        "train_label": train_missing.describe(),
        "samples": {"train": len(train.labels), "test": len(test.labels)},
        "encoders": {k: e.name for k, e in encoders.items()},
        "training": training,
        "rows": rows,
        "seconds": {"encode": encode_seconds, "total": time.perf_counter() - started},
    }
    write_results(results, output)
    return results
