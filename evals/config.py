"""What an evaluation run scores: its settings (`EvalConfig`), the checkpoints under evaluation
(`Method`, read by `resolve_method`), the test settings (`resolve_settings`), and the identity
of an output folder (settings and checkpoint fingerprints) that a resumed run must match.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mllm_missing.errors import ConfigError, DataFormatError

__all__ = [
    "SWEEP_RATES",
    "EvalConfig",
    "Method",
    "check_output",
    "resolve_method",
    "resolve_settings",
    "run_identity",
]

#: Test rates of ``--sweep``.
SWEEP_RATES = tuple(round(0.1 * i, 1) for i in range(11))
#: Settings of the output folder that change the numbers; a rerun must match them.
_IDENTITY = ("task", "data_root", "split", "seed", "bootstrap", "limit", "text_mode")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass
class EvalConfig:
    """Settings of one evaluation run (the flags of `mllm-missing eval`).

    Args:
        task: ``mmimdb``, ``hateful_memes`` or ``easy_vqa``.
        checkpoints: ``DIR`` or ``NAME=DIR``; DIR is a training output_dir or its ``best/``.
        data_root: folder of the official release (MM-IMDb, Hateful Memes).
        split: the split scored (default: the task's labelled test split).
        missing: test settings ``TYPE:RATE``; default ``both:0.7`` when no sweep is given.
        sweep: missing types swept over test rates 0, 0.1, ..., 1.0.
        compare: add the published anchors for the same setting.
        output_dir: where results (and the per-setting files that make a run resumable) go.
        seed: seed of the mask tables and of the bootstrap.
        bootstrap: bootstrap resamples of the 95 % interval.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        limit: score only the first N samples of the split.
        text_mode: MM-IMDb samples, ``movie`` or ``plot`` (default: the checkpoint's).
        cache_dir: dataset/feature cache (default ~/.cache/mllm_missing).
        backbone_weights: local weights of hub backbones (default: the checkpoint's).
        overwrite: discard earlier results in output_dir made with other settings.
        threads: torch CPU threads (0: torch's default).
        schedulers: scheduler kinds (``fixed``, ``rule``, ``llm``) routing each sample's presence
            pattern to one of the checkpoints (one per imputation + fusion pair).
        fixed: the ``fixed`` scheduler's option ``imputation+fusion`` (default: the first
            checkpoint's).
        validation_scores: per-pattern validation scores (a ``pattern_scores.json`` written by
            a ``--split val`` run); ``rule`` needs them, ``llm`` shows them to its LLM.
        scheduler_llm: the ``llm`` scheduler's model (preset or local path).
        scheduler_task: the task description the LLM reads (default: the task's).
    """

    task: str
    checkpoints: tuple[str, ...]
    data_root: str | None = None
    split: str | None = None
    missing: tuple[str, ...] = ()
    sweep: tuple[str, ...] = ()
    compare: bool = False
    output_dir: str = "runs/eval"
    seed: int = 0
    bootstrap: int = 1000
    device: str = "auto"
    limit: int | None = None
    text_mode: str | None = None
    cache_dir: str | None = None
    backbone_weights: str | None = None
    overwrite: bool = False
    threads: int = 0
    schedulers: tuple[str, ...] = ()
    fixed: str | None = None
    validation_scores: str | None = None
    scheduler_llm: str = "smollm2-135m-instruct"
    scheduler_task: str | None = None

    def __post_init__(self) -> None:
        from evals.tasks import TASKS
        from mllm_missing.scheduler import SCHEDULER_KINDS

        if self.task not in TASKS.names():
            raise ConfigError(f"task must be one of {', '.join(TASKS.names())}; got {self.task!r}")
        self.checkpoints = tuple(self.checkpoints)
        self.missing, self.sweep = tuple(self.missing), tuple(self.sweep)
        kinds = [k.strip() for k in ",".join(self.schedulers).split(",") if k.strip()]
        self.schedulers = tuple(dict.fromkeys(kinds))
        for kind in self.schedulers:
            if kind not in SCHEDULER_KINDS:
                raise ConfigError(
                    f"scheduler must be one of {', '.join(SCHEDULER_KINDS)}; got {kind!r}"
                )
        if self.validation_scores and not Path(self.validation_scores).is_file():
            raise ConfigError(f"validation_scores: no such file {self.validation_scores!r}")
        if not self.checkpoints:
            raise ConfigError("checkpoint: give at least one --checkpoint DIR (or NAME=DIR)")
        if self.task != "easy_vqa" and not self.data_root:
            raise ConfigError(f"data_root: {self.task} needs the folder of its official release")
        if self.text_mode not in (None, "movie", "plot"):
            raise ConfigError(f"text_mode must be one of movie, plot; got {self.text_mode!r}")
        if self.bootstrap < 1:
            raise ConfigError(f"bootstrap must be >= 1; got {self.bootstrap}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1; got {self.limit}")
        if self.device != "auto" and not self.device.startswith(("cpu", "cuda")):
            raise ConfigError(f"device must be auto, cpu or cuda[:N]; got {self.device!r}")
        resolve_settings(self)


@dataclass
class Method:
    """A checkpoint under evaluation.

    Attributes:
        name: its label in tables (``NAME=`` or the run folder's name).
        path: the saved model folder (``model_config.json`` + weights).
        spec: its ``model_config.json``.
        training: its training settings (train_missing, image_size, ...); empty if unknown.
        fingerprint: sha256 over the folder's files (a changed checkpoint is not resumed).
    """

    name: str
    path: Path
    spec: dict[str, Any]
    training: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""

    @property
    def train_missing(self) -> str:
        """The train-time setting ``TYPE:RATE``, or ``unknown``."""
        return str(self.training.get("train_missing", "unknown"))


def resolve_settings(config: EvalConfig) -> list[Any]:
    """The test settings to score: all-present first, then per type by rising rate.

    A rate of 0 is the same table whatever the type, so it is scored once (as ``both:0.0``);
    it is added whenever a 70 % setting is asked for, for the robustness ratio.
    """
    from evals.tasks import TASKS
    from mllm_missing.missing import MissingConfig, MissingType

    modalities = {m.value for m in TASKS.get(config.task).info.modalities}
    requested = [MissingConfig.parse(s, seed=config.seed) for s in config.missing]
    for kind in config.sweep:
        requested += [MissingConfig(type=kind, rate=r, seed=config.seed) for r in SWEEP_RATES]
    if not requested:
        requested = [MissingConfig.parse("both:0.7", seed=config.seed)]
    for setting in requested:
        kind = MissingType(setting.type).value
        if kind not in ("both", "any") and kind not in modalities:
            raise ConfigError(
                f"missing type {kind!r} is not a modality of {config.task} "
                f"({', '.join(sorted(modalities))}); use one of them, both or any"
            )
    if any(s.rate == 0.7 for s in requested):
        requested.append(MissingConfig(type="both", rate=0.0, seed=config.seed))
    requested = [MissingConfig(type="both", rate=0.0, seed=config.seed) if s.rate == 0 else s
                 for s in requested]  # fmt: skip
    kinds = list(dict.fromkeys(MissingType(s.type).value for s in requested if s.rate > 0))
    unique = {s.slug: s for s in requested}
    return sorted(
        unique.values(),
        key=lambda s: (s.rate > 0, kinds.index(MissingType(s.type).value) if s.rate else 0, s.rate),
    )


def _fingerprint(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _training_settings(folder: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """From the checkpoint's spec, or (older checkpoints) the run's ``results.json`` config."""
    if isinstance(spec.get("training"), dict):
        return dict(spec["training"])
    results = folder.parent / "results.json"
    if results.is_file():
        try:
            config = json.loads(results.read_text(encoding="utf-8")).get("config", {})
        except json.JSONDecodeError:
            return {}
        keys = ("dataset", "train_missing", "seed", "image_size", "text_mode", "backbone_weights")
        return {k: config[k] for k in keys if k in config}
    return {}


def resolve_method(spec: str, task: Any) -> Method:
    """Read ``NAME=DIR`` / ``DIR`` and check the checkpoint fits `task` (its TaskInfo)."""
    name, sep, directory = spec.partition("=")
    if not sep:
        name, directory = "", spec
    folder = Path(directory)
    if not folder.is_dir():
        raise ConfigError(f"checkpoint {directory!r}: no such folder")
    if not (folder / "model_config.json").is_file() and (folder / "best").is_dir():
        folder = folder / "best"
    config_path = folder / "model_config.json"
    if not config_path.is_file():
        raise DataFormatError(
            f"checkpoint {directory!r}: no model_config.json in it or in its best/; "
            "pass a training output_dir or its best/ folder"
        )
    try:
        model_spec = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{config_path}: not valid JSON ({exc})") from None
    trained_on = model_spec.get("task")
    if trained_on != task.name or model_spec.get("num_labels") != task.num_labels:
        raise ConfigError(
            f"checkpoint {directory!r} was trained for {trained_on} with "
            f"{model_spec.get('num_labels')} label(s); task {task.name} needs {task.num_labels}"
        )
    if not name:
        name = (folder.parent if folder.name == "best" else folder).resolve().name
    if not _NAME.match(name):
        raise ConfigError(f"checkpoint name {name!r}: use letters, digits and _ . + -")
    training = _training_settings(folder, model_spec)
    return Method(name, folder, model_spec, training, _fingerprint(folder))


def run_identity(config: EvalConfig, methods: Sequence[Method]) -> dict[str, Any]:
    ident: dict[str, Any] = {k: getattr(config, k) for k in _IDENTITY}
    if ident["data_root"]:
        ident["data_root"] = str(Path(ident["data_root"]).resolve())
    ident["methods"] = {m.name: m.fingerprint for m in methods}
    return ident


def check_output(config: EvalConfig, ident: dict[str, Any], output: Path) -> dict[str, Any]:
    """Refuse an output folder holding results made with other settings (unless --overwrite);
    return the identity to store (methods evaluated earlier are kept)."""
    path = output / "eval_config.json"
    if not path.is_file():
        return ident
    old = json.loads(path.read_text(encoding="utf-8"))
    differ = [k for k in _IDENTITY if old.get(k) != ident[k]]
    changed = [n for n, f in ident["methods"].items() if old.get("methods", {}).get(n, f) != f]
    differ += [f"checkpoint {n} (its files changed)" for n in changed]
    if differ and not config.overwrite:
        details = "; ".join(
            f"{k}: {old.get(k)!r} then, {ident[k]!r} now" if k in ident else k for k in differ
        )
        raise ConfigError(
            f"{output} holds results made with other settings ({details}); pass --overwrite "
            "to discard them or choose another --output-dir"
        )
    if differ:
        shutil.rmtree(output / "rows", ignore_errors=True)
        shutil.rmtree(output / "masks", ignore_errors=True)
        shutil.rmtree(output / "logits", ignore_errors=True)
        return ident
    return {**ident, "methods": {**old.get("methods", {}), **ident["methods"]}}
