"""`TrainConfig`: one recipe run (data, backbone, strategy, missingness, loop), checked at load."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mllm_missing.errors import ConfigError
from mllm_missing.missing import MissingConfig

__all__ = ["DATASETS", "TrainConfig", "load_train_config"]

#: Dataset -> (train, validation, test) default splits; None: hold out part of train.
DATASETS: dict[str, tuple[str, str | None, str]] = {
    "easy_vqa": ("train", None, "test"),
    "mmimdb": ("train", "dev", "test"),
    "hateful_memes": ("train", "dev_seen", "test_seen"),
}
_MIXED_PRECISION = ("no", "bf16", "fp16")
_LOGS = ("csv", "tensorboard", "both", "none")


@dataclass
class TrainConfig:
    """Settings of `mllm-missing train` (the fields of a recipe YAML).

    Args:
        dataset: ``easy_vqa``, ``mmimdb`` or ``hateful_memes``.
        data_root: folder of the official release (MM-IMDb, Hateful Memes).
        text_mode: MM-IMDb samples: ``movie`` (one per movie) or ``plot`` (one per plot).
        train_split: training split (default per dataset).
        val_split: validation split; None holds out `val_fraction` of train (easy-VQA has none).
        test_split: split scored after training.
        val_fraction: share of train held out when there is no validation split.
        limit_train: use only the first N training samples (quick runs).
        limit_val: use only the first N validation samples.
        limit_test: use only the first N test samples.
        backbone: backbone preset (``mllm-missing backbones`` lists them).
        backbone_weights: a local checkpoint for presets whose weights come from a hub.
        image_size: image resolution of the offline default's EfficientNet.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda[:N]``.
        quantization: bitsandbytes quantization of the backbone's LLM, ``none``, ``int8``,
            ``nf4`` or ``fp4`` (transformers LLM presets; with ``lora`` this is QLoRA).
        strategy: the strategy config, a mapping with ``method`` (``none``, ``map_prompts``,
            ``modality_prompts``, ``correlated_prompts``, ``lora``) and its fields.
        imputation: fills absent embeddings of towers the strategy does not adapt.
        fusion: fusion module.
        hidden_size: width of the fusion projections and of the head.
        routed_head: one head per presence pattern instead of one shared head.
        train_missing: missingness of the training and validation splits, ``TYPE:RATE``.
        test_missing: settings the test split is scored at.
        epochs: training epochs.
        batch_size: samples per step.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_ratio: share of steps with a linear warm-up (then cosine decay).
        grad_accum: gradient accumulation steps.
        max_grad_norm: gradient clipping norm (0: none).
        mixed_precision: ``no``, ``bf16`` or ``fp16`` (CUDA only).
        seed: seed of the masks, the split and training.
        checkpoint_every: also checkpoint every N optimizer steps (0: at epoch ends only).
        log: ``csv``, ``tensorboard``, ``both`` or ``none``.
        output_dir: where checkpoints, the best model and results go.
        cache_dir: dataset/feature cache (default ~/.cache/mllm_missing).
        threads: torch CPU threads (0: torch's default).
    """

    dataset: str = "easy_vqa"
    data_root: str | None = None
    text_mode: str = "movie"
    train_split: str | None = None
    val_split: str | None = None
    test_split: str | None = None
    val_fraction: float = 0.1
    limit_train: int | None = None
    limit_val: int | None = None
    limit_test: int | None = None
    backbone: str = "offline-default"
    backbone_weights: str | None = None
    image_size: int = 128
    device: str = "auto"
    quantization: str = "none"
    strategy: dict[str, Any] = field(default_factory=lambda: {"method": "none"})
    imputation: str = "zero"
    fusion: str = "concat"
    hidden_size: int = 256
    routed_head: bool = False
    train_missing: str = "both:0.7"
    test_missing: tuple[str, ...] = ("both:0.7", "both:0.0")
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
    cache_dir: str | None = None
    threads: int = 0

    def __post_init__(self) -> None:
        from mllm_missing.backbones.presets import get_preset
        from mllm_missing.strategies.base import strategy_config_from_dict
        from mllm_missing.strategies.fusion import FusionConfig
        from mllm_missing.strategies.imputation import ImputationConfig

        if self.dataset not in DATASETS:
            raise ConfigError(f"dataset must be one of {', '.join(DATASETS)}; got {self.dataset!r}")
        train, val, test = DATASETS[self.dataset]
        self.train_split = self.train_split or train
        self.val_split = self.val_split or val
        self.test_split = self.test_split or test
        if self.dataset != "easy_vqa" and not self.data_root:
            raise ConfigError(f"data_root: {self.dataset} needs the folder of its official release")
        if self.text_mode not in ("movie", "plot"):
            raise ConfigError(f"text_mode must be one of movie, plot; got {self.text_mode!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1); got {self.val_fraction}")
        preset = get_preset(self.backbone)
        from mllm_missing.backbones.presets import QUANTIZABLE_FAMILIES
        from mllm_missing.inference.quantization import QuantizationConfig

        quantized = QuantizationConfig(mode=self.quantization).enabled
        if quantized and preset.family not in QUANTIZABLE_FAMILIES:
            raise ConfigError(
                f"quantization: {self.quantization} applies to transformers LLM presets "
                f"({', '.join(QUANTIZABLE_FAMILIES)}); {self.backbone} is {preset.family}"
            )
        if not isinstance(self.strategy, dict):
            raise ConfigError("strategy must be a mapping with a 'method' key")
        strategy_config_from_dict(self.strategy)
        ImputationConfig(method=self.imputation)
        FusionConfig(method=self.fusion, hidden_size=self.hidden_size)
        MissingConfig.parse(self.train_missing)
        self.test_missing = tuple(self.test_missing)
        for setting in self.test_missing:
            MissingConfig.parse(setting)
        for name in ("epochs", "batch_size", "hidden_size", "image_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1; got {getattr(self, name)}")
        for name in ("limit_train", "limit_val", "limit_test"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 or null; got {value}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive; got {self.lr}")
        if self.mixed_precision not in _MIXED_PRECISION:
            raise ConfigError(
                f"mixed_precision must be one of {', '.join(_MIXED_PRECISION)}; "
                f"got {self.mixed_precision!r}"
            )
        if self.log not in _LOGS:
            raise ConfigError(f"log must be one of {', '.join(_LOGS)}; got {self.log!r}")
        if self.device != "auto" and not self.device.startswith(("cpu", "cuda")):
            raise ConfigError(f"device must be auto, cpu or cuda[:N]; got {self.device!r}")


def load_train_config(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> TrainConfig:
    """Load a recipe YAML with ``key=value`` overrides; ``strategy.FIELD=value`` sets one
    strategy field. Everything is checked before any work starts."""
    import yaml

    from mllm_missing.config import load_config, parse_overrides

    parsed = parse_overrides(list(overrides))
    nested = {k.split(".", 1)[1]: v for k, v in parsed.items() if k.startswith("strategy.")}
    flat = {k: v for k, v in parsed.items() if not k.startswith("strategy.")}
    unknown = [k for k in flat if "." in k]
    if unknown:
        names = ", ".join(f.name for f in fields(TrainConfig))
        raise ConfigError(f"unknown key {unknown[0]!r}; allowed: {names} (and strategy.FIELD)")
    if nested:
        strategy: dict[str, Any] = {"method": "none"}
        if path is not None and Path(path).is_file():
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
            if isinstance(loaded, dict) and isinstance(loaded.get("strategy"), dict):
                strategy = dict(loaded["strategy"])
        if isinstance(flat.get("strategy"), dict):
            strategy = dict(flat["strategy"])
        strategy.update(nested)
        flat["strategy"] = strategy
    return load_config(TrainConfig, path, flat)
