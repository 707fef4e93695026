"""Train a `MissingAwareVLM` (projector + missing-image tokens, frozen LM) on easy-VQA, and score it.

Each training sample is a chat: the question (with the image's projected tokens, or with the
learned missing-image tokens when image dropout marks it absent) and the answer word as the
assistant turn; the loss is the cross-entropy on the answer and end-of-turn tokens. The loop is
the shared `fit` (seeded, resumable, atomic checkpoints). Answer accuracy ranks the 13 answers
by log-likelihood (`MissingAwareVLM.score_answers`), so every prediction is a valid answer.

The image-absent conditions are also scored on validation questions (train questions used
neither for training nor for the per-epoch check), written under ``val`` in ``results.json``:
a chat scheduler choosing between the learned tokens and the status line reads those, never the
test scores.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mllm_missing.atomic import atomic_write_text
from mllm_missing.errors import ConfigError
from mllm_missing.types import Presence, status_text

__all__ = [
    "CONDITIONS",
    "RECIPE_CONFIG_FILE",
    "VAL_CONDITIONS",
    "VLMTask",
    "VLMTrainConfig",
    "load_trained_vlm",
    "run_vlm_training",
    "subset_rows",
]

logger = logging.getLogger(__name__)

#: Evaluation conditions: trained model with the image / without it (missing tokens) / without
#: it and told so in text instead (`STATUS_LINE`, the MissRAG prompt, no missing tokens), and
#: the references: untrained projector with the image, plain text-only SmolLM2 (no image tokens).
CONDITIONS = ("present", "absent", "absent_status", "untrained_present", "text_only")
#: The status line the ``absent_status`` condition puts before each question.
STATUS_LINE = status_text(Presence.of("text"))
RECIPE_CONFIG_FILE = "recipe_config.json"
#: The image-absent conditions, also scored on the choice validation questions (``val``).
VAL_CONDITIONS = ("absent", "absent_status")
#: Config fields that do not change a score already written: a resumed run with other values
#: keeps them (``choice_val_size`` is checked against each ``val`` score's question count).
_BOOKKEEPING = ("conditions", "choice_val_size", "eval_batch_size", "checkpoint_every",
                "threads", "cache_dir", "output_dir")  # fmt: skip


@dataclass
class VLMTrainConfig:
    """Settings of the easy-VQA projector recipe (the fields of its YAML).

    Args:
        num_image_tokens: image tokens spliced into the prompt (and missing tokens).
        projector_dim: width of the projector's middle layer (None: the LM's width).
        image_size: resolution EfficientNet-Lite0 sees (easy-VQA images are 64x64).
        system_prompt: system message of every chat (``""``: an empty system turn, shortest).
        train_size: training questions (a seeded sample of the train split).
        val_size: held-out train questions scored after each epoch (image present).
        choice_val_size: further held-out train questions on which the image-absent conditions
            (``absent``, ``absent_status``) are scored, under ``val`` in ``results.json``: what
            a scheduler picks a prompt by (0: not scored). 128 questions cannot separate two
            prompts a few points apart (standard error ~4 points), 1000 can (~1.5).
        test_size: test questions scored at the end (the first of a permutation seeded 0, so
            every run and seed scores the same subset).
        image_dropout: share of training samples whose image is marked absent (seeded table).
        conditions: what is scored on the test subset (see `CONDITIONS`); with neither
            ``present`` nor ``absent`` nothing is trained (the references alone).
        epochs, batch_size, lr, weight_decay, warmup_ratio, max_grad_norm, seed: the loop.
        eval_batch_size: questions scored per forward pass.
        checkpoint_every: optimizer steps between checkpoints (0: at epoch ends only).
        threads: torch CPU threads (0: leave torch's default).
        cache_dir: cache root for datasets, features and the converted SmolLM2.
        output_dir: run folder (checkpoints, ``best/``, ``results.json``).
    """

    num_image_tokens: int = 4
    projector_dim: int | None = None
    image_size: int = 128
    system_prompt: str = ""
    train_size: int = 3000
    val_size: int = 128
    choice_val_size: int = 1000
    test_size: int = 1000
    image_dropout: float = 0.3
    conditions: tuple[str, ...] = CONDITIONS
    epochs: int = 1
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_batch_size: int = 32
    checkpoint_every: int = 10
    threads: int = 1
    cache_dir: str | None = None
    output_dir: str = "runs/easy_vqa/smollm2-efficientnet_projector"

    def __post_init__(self) -> None:
        for name in ("num_image_tokens", "image_size", "train_size", "val_size", "test_size",
                     "epochs", "batch_size", "eval_batch_size"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.projector_dim is not None and self.projector_dim < 1:
            raise ConfigError(f"projector_dim must be >= 1 or null; got {self.projector_dim}")
        if not 0.0 <= self.image_dropout < 1.0:
            raise ConfigError(f"image_dropout must be in [0, 1); got {self.image_dropout}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive; got {self.lr}")
        for name in ("choice_val_size", "weight_decay", "max_grad_norm", "checkpoint_every",
                     "threads"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0; got {getattr(self, name)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1); got {self.warmup_ratio}")
        self.conditions = tuple(self.conditions)
        for condition in self.conditions:
            if condition not in CONDITIONS:
                raise ConfigError(
                    f"conditions: unknown {condition!r}; allowed: {', '.join(CONDITIONS)}"
                )


def subset_rows(total: int, count: int, seed: int, skip: int = 0) -> list[int]:
    """Rows ``skip .. skip+count`` of a permutation of ``range(total)`` seeded by `seed`, sorted."""
    order = np.random.default_rng(seed).permutation(total)
    if skip + count > total:
        raise ConfigError(f"asked for {skip + count} of {total} questions")
    return sorted(order[skip : skip + count].tolist())


@dataclass
class _Questions:
    """Questions, answers and image features (absent rows: None) of a subset."""

    questions: list[str]
    answers: list[str]
    labels: torch.Tensor
    features: torch.Tensor
    present: torch.Tensor

    def features_of(self, rows: torch.Tensor) -> list[torch.Tensor | None]:
        return [self.features[r] if self.present[r] else None for r in rows.tolist()]

    def without_images(self, prefix: str | None = None) -> _Questions:
        """The same questions with every image absent, each after `prefix`'s line if given."""
        questions = self.questions if prefix is None else [f"{prefix}\n{q}" for q in self.questions]
        absent = torch.zeros(len(self.questions), dtype=torch.bool)
        return _Questions(questions, self.answers, self.labels, self.features, absent)


class VLMTask:
    """A `TrainTask` for `fit`: the projector + missing tokens on training questions."""

    metric = "accuracy"
    higher_is_better = True

    def __init__(
        self,
        model: Any,
        train: _Questions,
        val: _Questions,
        options: list[str],
        config: VLMTrainConfig | None = None,
    ):
        self.model = model
        self.config = config
        self.train = train
        self.val = val
        self.options = options
        self.num_train = len(train.questions)

    def trainable_module(self) -> torch.nn.Module:
        """The `MissingAwareVLM` (only the projector and the missing tokens require grad)."""
        module: torch.nn.Module = self.model
        return module

    def frozen_parameter_count(self) -> int:
        """Parameters of the frozen LM."""
        return sum(p.numel() for p in self.model.vlm.lm.parameters())

    def loss(self, rows: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on the answer tokens of the rows' chats."""
        loss: torch.Tensor = self.model.loss(
            [self.train.questions[r] for r in rows.tolist()],
            [self.train.answers[r] for r in rows.tolist()],
            image_features=self.train.features_of(rows),
        )
        return loss

    def evaluate(self) -> dict[str, float]:
        """Answer accuracy on the validation questions (image present)."""
        return {"accuracy": accuracy(self.model, self.val, self.options, 32)}

    def save_pretrained(self, directory: Path) -> None:
        """The projector, the missing tokens and the recipe config (`RECIPE_CONFIG_FILE`)."""
        self.model.write_files(directory)
        if self.config is not None:
            text = json.dumps(asdict(self.config), indent=2)
            (Path(directory) / RECIPE_CONFIG_FILE).write_text(text + "\n", encoding="utf-8")


def accuracy(
    model: Any,
    data: _Questions,
    options: list[str],
    batch_size: int,
    *,
    use_missing_tokens: bool = True,
    desc: str = "scoring",
) -> float:
    """Share of `data` whose best-scored option is the right answer."""
    from tqdm.auto import tqdm

    model.eval()
    correct = 0
    rows = torch.arange(len(data.questions))
    for chunk in tqdm(rows.split(batch_size), desc=desc, leave=False):
        scores = model.score_answers(
            [data.questions[r] for r in chunk.tolist()],
            options,
            image_features=data.features_of(chunk),
            use_missing_tokens=use_missing_tokens,
        )
        correct += int((scores.argmax(1) == data.labels[chunk]).sum())
    return correct / max(len(data.questions), 1)


def _load(
    config: VLMTrainConfig, dataset: Any, split: str, rows: list[int], encoder: Any
) -> _Questions:
    from mllm_missing.backbones.features import encode_column
    from mllm_missing.data.base import cache_root
    from mllm_missing.data.easy_vqa import ANSWERS

    table = encode_column(
        dataset,
        "image",
        encoder.encode,
        key_column="image_id",
        cache_path=cache_root(config.cache_dir)
        / "features"
        / f"{encoder.name}-{config.image_size}-easy_vqa-{split}.st",
        desc=f"{split} images",
    )
    subset = dataset.select(rows).select_columns(["text", "label", "image_id"])[:]
    labels = torch.tensor(subset["label"], dtype=torch.long)
    return _Questions(
        questions=list(subset["text"]),
        answers=[ANSWERS[i] for i in labels.tolist()],
        labels=labels,
        features=table.lookup([str(i) for i in subset["image_id"]]),
        present=torch.ones(len(rows), dtype=torch.bool),
    )


def run_vlm_training(config: VLMTrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Train, score the conditions on the test subset and the image-absent ones on validation
    questions, write ``results.json``; return it.

    With `resume`, training continues from the last checkpoint (a finished run is not trained
    again) and only the scores not yet written are computed.
    """
    from mllm_missing.backbones.hf import load_smollm2
    from mllm_missing.backbones.missing_aware_vlm import MissingAwareVLM
    from mllm_missing.backbones.offline import load_default_image_encoder
    from mllm_missing.backbones.projector_vlm import ProjectorVLM
    from mllm_missing.data.easy_vqa import ANSWERS, load_easy_vqa
    from mllm_missing.training.trainer import LoopConfig, fit

    started = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    output = Path(config.output_dir)
    encoder = load_default_image_encoder(image_size=config.image_size)
    train_set = load_easy_vqa(split="train", cache_dir=config.cache_dir)
    test_set = load_easy_vqa(split="test", cache_dir=config.cache_dir)
    train_rows = subset_rows(len(train_set), config.train_size, config.seed)
    val_rows = subset_rows(len(train_set), config.val_size, config.seed, skip=config.train_size)
    train = _load(config, train_set, "train", train_rows, encoder)
    val = _load(config, train_set, "train", val_rows, encoder)
    choice_val = None
    if config.choice_val_size and set(VAL_CONDITIONS) & set(config.conditions):
        choice_rows = subset_rows(
            len(train_set), config.choice_val_size, config.seed,
            skip=config.train_size + config.val_size,
        )  # fmt: skip
        choice_val = _load(config, train_set, "train", choice_rows, encoder)
    test_rows = subset_rows(len(test_set), config.test_size, 0)
    test = _load(config, test_set, "test", test_rows, encoder)
    # Image dropout as data: a seeded table of which training samples have no image.
    generator = torch.Generator().manual_seed(config.seed + 7919)
    train.present = torch.rand(len(train_rows), generator=generator) >= config.image_dropout
    prepared = time.perf_counter() - started

    lm = load_smollm2(cache_dir=config.cache_dir)
    torch.manual_seed(config.seed)
    vlm = ProjectorVLM(
        lm, image_dim=encoder.dim, num_image_tokens=config.num_image_tokens,
        projector_dim=config.projector_dim,
    )  # fmt: skip
    model = MissingAwareVLM(vlm, system_prompt=config.system_prompt)
    options = list(ANSWERS)
    results: dict[str, Any] = {"config": asdict(config), "complete": False, "test": {}, "val": {}}
    results_path = output / "results.json"
    if (output / "checkpoints" / "last").exists() and not resume:
        raise ConfigError(
            f"{output} already holds a checkpoint; pass --resume to continue it or choose "
            "another output_dir (nothing there is overwritten)"
        )
    previous: dict[str, Any] = {}
    if resume and results_path.is_file():
        previous = json.loads(results_path.read_text(encoding="utf-8"))
        # Scores written before (an interruption, or a finished run resumed to add conditions
        # or the validation scores) are kept when nothing that changes them differs.
        if _same_scores(previous.get("config", {}), results["config"]):
            results["test"] = previous.get("test", {})
            results["val"] = {
                condition: row for condition, row in previous.get("val", {}).items()
                if row.get("questions") == config.choice_val_size
            }  # fmt: skip
        else:
            previous = {}

    def score(split: str, condition: str, data: _Questions | None, missing: bool) -> None:
        if data is None or condition not in config.conditions or condition in results[split]:
            return
        results[split][condition] = _timed(model, data, options, config, missing, split, condition)
        output.mkdir(parents=True, exist_ok=True)
        atomic_write_text(results_path, json.dumps(results, indent=2))

    score("test", "untrained_present", test, True)
    score("test", "text_only", test.without_images(), False)

    loop = LoopConfig(
        epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
        weight_decay=config.weight_decay, warmup_ratio=config.warmup_ratio,
        max_grad_norm=config.max_grad_norm, seed=config.seed,
        checkpoint_every=config.checkpoint_every, output_dir=str(output),
    )  # fmt: skip
    if not {"present", "absent"} & set(config.conditions):
        # Only the references asked for: nothing to train.
        results["complete"] = True
        atomic_write_text(results_path, json.dumps(results, indent=2))
        return results
    task = VLMTask(model, train, val, options, config)
    train_started = time.perf_counter()
    fitted = fit(task, loop, resume=resume)
    train_seconds = time.perf_counter() - train_started
    # Score the best epoch's parameters, as saved for chat.
    model = MissingAwareVLM.from_pretrained(output / "best", vlm)
    if choice_val is not None:
        score("val", "absent", choice_val.without_images(), True)
        score("val", "absent_status", choice_val.without_images(STATUS_LINE), False)
    score("test", "present", test, True)
    score("test", "absent", test.without_images(), True)
    score("test", "absent_status", test.without_images(STATUS_LINE), False)
    training = {
        "steps": fitted.steps,
        "seconds": train_seconds,
        "steps_per_second": fitted.steps / max(train_seconds, 1e-9),
        "history": fitted.history,
        "trainable_parameters": fitted.trainable_parameters,
        "frozen_parameters": fitted.frozen_parameters,
    }
    earlier = previous.get("training", {})
    if previous.get("complete") and earlier.get("steps") == fitted.steps:
        training = earlier  # a finished run resumed: nothing was trained, keep its timing
    results.update(
        complete=True,
        task="easy_vqa",
        metric="accuracy",
        answers=options,
        sizes={
            "train": len(train_rows),
            "val": len(val_rows),
            "choice_val": 0 if choice_val is None else len(choice_val.questions),
            "test": len(test.questions),
            "train_image_absent": int((~train.present).sum()),
        },
        training=training,
        models={"language_model": lm.name, "image_encoder": encoder.name},
        checkpoint=str(output / "best"),
        seconds={
            "prepare": prepared,
            "total": time.perf_counter() - started,
            **({"before_resume": previous["seconds"]["total"]} if "seconds" in previous else {}),
        },
        versions={"python": platform.python_version(), "torch": torch.__version__},
    )
    atomic_write_text(results_path, json.dumps(results, indent=2))
    return results


def _same_scores(previous: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether scores written under config `previous` hold for `current` (`_BOOKKEEPING` aside;
    a field `previous` predates counts as its default)."""
    defaults = asdict(VLMTrainConfig())
    return all(
        previous.get(name, defaults[name]) == value
        for name, value in current.items()
        if name not in _BOOKKEEPING
    )


def _timed(
    model: Any,
    data: _Questions,
    options: list[str],
    config: VLMTrainConfig,
    use_missing_tokens: bool,
    split: str,
    condition: str,
) -> dict[str, float]:
    started = time.perf_counter()
    value = accuracy(
        model, data, options, config.eval_batch_size,
        use_missing_tokens=use_missing_tokens, desc=f"{split} {condition}",
    )  # fmt: skip
    seconds = time.perf_counter() - started
    logger.info("%s %s: accuracy %.4f (%d questions, %.0f s)", split, condition, value,
                len(data.questions), seconds)  # fmt: skip
    questions = len(data.questions)
    return {"accuracy": value, "questions": questions, "correct": round(value * questions),
            "seconds": seconds}  # fmt: skip


def load_trained_vlm(
    directory: str | Path, *, cache_dir: str | None = None, device: str | torch.device = "cpu"
) -> Any:
    """The offline VLM (EfficientNet-Lite0 + SmolLM2) with a trained checkpoint loaded, for chat.

    Args:
        directory: a checkpoint folder written by the recipe (``output_dir/best``).
        cache_dir: cache root of the converted SmolLM2 copy.
        device: where to put the models.

    Returns:
        A `MissingAwareVLM`: ``generate(question, image)`` with a PIL image, or None when the
        image is absent (the learned missing tokens stand in for it).
    """
    from mllm_missing.backbones.hf import load_smollm2
    from mllm_missing.backbones.missing_aware_vlm import MissingAwareVLM
    from mllm_missing.backbones.offline import load_default_image_encoder
    from mllm_missing.backbones.projector_vlm import CONFIG_FILE, ProjectorVLM

    directory = Path(directory)
    settings: dict[str, Any] = {}
    if (directory / RECIPE_CONFIG_FILE).is_file():
        settings = json.loads((directory / RECIPE_CONFIG_FILE).read_text(encoding="utf-8"))
    projector = json.loads((directory / "projector" / CONFIG_FILE).read_text(encoding="utf-8"))
    image_size = int(settings.get("image_size", VLMTrainConfig.image_size))
    vlm = ProjectorVLM(
        load_smollm2(cache_dir=cache_dir, device=device),
        load_default_image_encoder(image_size=image_size, device=device),
        num_image_tokens=int(projector["num_image_tokens"]),
        projector_dim=int(projector["projector_dim"]),
    )
    return MissingAwareVLM.from_pretrained(directory, vlm)
