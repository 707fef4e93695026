"""Batched inference over requests with missing modalities: group by presence pattern, select the
modules once per pattern, run the model's own encode + predict path in batches.

Requests are `Sample`s. The engine groups them by presence pattern (``image+text``, ``text``,
...), asks its `ModuleSelector` once per distinct pattern which imputation + fusion to run
(cached; the LLM scheduler plugs in here), and runs each group in batches of similar text length
(less padding) under ``torch.inference_mode()``, with bf16 autocast on CUDA. The forward is the
training code's (`mllm_missing.training.data.embed_rows` then `MissingModalityModel.forward`):
a request is encoded exactly as a validation row is, so predictions equal the evaluation's.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from mllm_missing.errors import ConfigError
from mllm_missing.model import MissingModalityModel
from mllm_missing.types import MODALITY_ORDER, Modality, Presence, Sample

__all__ = [
    "FixedSelector",
    "InferenceEngine",
    "ModuleChoice",
    "ModuleSelector",
    "Prediction",
    "fixed_selector",
    "model_choice",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModuleChoice:
    """Which imputation and fusion module run for a presence pattern, and for an LLM backbone
    how it is told what is missing.

    Attributes:
        imputation: an imputation method name (``zero``, ``mean``, ``knn``, ...); None for a
            model with no imputation module (a VLM choosing only its prompt).
        fusion: a fusion method name (``concat``, ``masked_attention``, ...); None likewise.
        prompt: ``learned`` (the learned missing-aware prompts) or ``status_text`` (the status
            line in the input) for LLM backbones; None where there is no prompt choice. The
            classifier engine has none and refuses a choice that sets it.
    """

    imputation: str | None
    fusion: str | None
    prompt: str | None = None

    def __str__(self) -> str:
        """``zero+concat``, ``zero+concat+status_text``, or just ``status_text`` (a VLM)."""
        parts = (self.imputation, self.fusion, self.prompt)
        return "+".join(p for p in parts if p is not None)


@runtime_checkable
class ModuleSelector(Protocol):
    """Picks the modules for one presence pattern; called once per distinct pattern."""

    def __call__(self, presence: Presence) -> ModuleChoice:
        """The imputation + fusion to run on samples with this presence."""
        ...


class FixedSelector:
    """The same modules for every presence pattern.

    Args:
        choice: the modules.
    """

    def __init__(self, choice: ModuleChoice) -> None:
        self.choice = choice

    def __call__(self, presence: Presence) -> ModuleChoice:
        """`choice`, whatever the presence."""
        return self.choice


def fixed_selector(imputation: str, fusion: str) -> FixedSelector:
    """A selector returning ``imputation`` + ``fusion`` for every pattern."""
    return FixedSelector(ModuleChoice(imputation, fusion))


def model_choice(model: MissingModalityModel) -> ModuleChoice:
    """The modules `model` was built with (its spec's ``imputation`` and ``fusion``)."""
    return ModuleChoice(model.spec.get("imputation", "zero"), model.spec.get("fusion", "concat"))


@dataclass
class Prediction:
    """The model's output for one request.

    Attributes:
        id: the request's id.
        presence: which modalities it had.
        logits: the head's raw outputs (float, CPU).
        choice: the modules that ran.
    """

    id: str
    presence: Presence
    logits: torch.Tensor
    choice: ModuleChoice

    def to_row(self, task_type: str, label_names: Sequence[str]) -> dict[str, Any]:
        """A JSON-ready row: ``id``, ``presence``, ``modules`` and ``prediction`` (label name(s)
        and scores: softmax probabilities for multiclass, sigmoid for binary / multilabel)."""
        logits = self.logits.float()
        prediction: dict[str, Any]
        if task_type == "multiclass":
            probs = logits.softmax(-1).tolist()
            best = int(logits.argmax())
            prediction = {
                "label": label_names[best],
                "scores": {n: round(p, 6) for n, p in zip(label_names, probs)},
            }
        elif task_type == "binary":
            prob = float(logits.reshape(-1)[0].sigmoid())
            prediction = {
                "label": label_names[0] if prob >= 0.5 else f"not {label_names[0]}",
                "scores": {label_names[0]: round(prob, 6)},
            }
        else:  # multilabel: every label at sigmoid >= 0.5, the metrics' threshold
            probs = logits.sigmoid().tolist()
            prediction = {
                "labels": [n for n, p in zip(label_names, probs) if p >= 0.5],
                "scores": {n: round(p, 6) for n, p in zip(label_names, probs)},
            }
        return {
            "id": self.id,
            "presence": self.presence.pattern,
            "modules": str(self.choice),
            "prediction": prediction,
        }


def _payload_key(value: Any) -> str:
    # Equal strings (texts, paths) are the same input; other objects are equal only to themselves.
    return f"s:{value}" if isinstance(value, str) else f"o:{id(value)}"


def _text_length(sample: Sample) -> int:
    text = sample.payloads.get(Modality.TEXT)
    return len(text) if isinstance(text, str) else 0


class InferenceEngine:
    """Batched prediction for `Sample` requests with any presence pattern.

    Args:
        model: the trained model (its backbone is used as is: quantized, device-mapped, ...).
        selector: picks the modules per presence pattern (default: the model's own modules for
            every pattern, `model_choice`).
        batch_size: requests per forward pass.
        device: where inputs go (default: the model's device).
        dtype: autocast dtype (``"bfloat16"``, ``"float16"``); default bf16 on CUDA and none
            (float32) on the CPU. ``"float32"`` turns autocast off.
        candidates: more trained models a selector may choose from, by their modules; they must
            share the task (label names) with `model`.

    Raises:
        ConfigError: a bad batch size or dtype, or candidates for another task.
    """

    def __init__(
        self,
        model: MissingModalityModel,
        *,
        selector: ModuleSelector | None = None,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        candidates: Mapping[ModuleChoice, MissingModalityModel] | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1; got {batch_size!r}")
        self.model = model
        self.models: dict[ModuleChoice, MissingModalityModel] = {model_choice(model): model}
        for choice, other in (candidates or {}).items():
            if other.spec.get("label_names") != model.spec.get("label_names"):
                raise ConfigError(f"candidate {choice}: trained for other labels than the model")
            self.models[choice] = other
        self.selector: ModuleSelector = selector or FixedSelector(model_choice(model))
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.dtype = _autocast_dtype(dtype, self.device)
        self._choices: dict[Presence, ModuleChoice] = {}
        self.selector_calls = 0

    @property
    def task_type(self) -> str:
        """The model's task type (``multiclass``, ``binary``, ``multilabel``)."""
        return str(self.model.spec["task_type"])

    @property
    def label_names(self) -> list[str]:
        """The model's label names (``label_0``, ... when the checkpoint has none)."""
        names = self.model.spec.get("label_names")
        count = int(self.model.spec["num_labels"])
        return list(names) if names else [f"label_{i}" for i in range(count)]

    def select(self, presence: Presence) -> ModuleChoice:
        """The modules for `presence`: the selector's answer, asked once per pattern.

        Raises:
            ConfigError: the selector chose modules no loaded model has, or a prompt (a
                classifier has no prompt choice: refused rather than silently dropped).
        """
        if presence not in self._choices:
            self.selector_calls += 1
            choice = self.selector(presence)
            if choice.prompt is not None:
                raise ConfigError(
                    f"the selector chose {choice} for {presence.pattern}, but a classifier has no "
                    f"prompt choice ({choice.prompt!r}); schedule imputation+fusion options only "
                    "(SchedulerConfig without prompts) or chat with a VLM"
                )
            if choice not in self.models:
                known = ", ".join(str(c) for c in self.models)
                raise ConfigError(
                    f"the selector chose {choice} for {presence.pattern}; loaded: {known}"
                )
            self._choices[presence] = choice
        return self._choices[presence]

    def check(self, sample: Sample) -> None:
        """Refuse a request the model cannot read (a modality it has no tower for).

        Raises:
            ConfigError: naming the request and the model's modalities.
        """
        extra = sample.presence.modalities - set(self.model.modalities)
        if extra:
            names = ", ".join(m.value for m in self.model.modalities)
            raise ConfigError(
                f"request {sample.id!r}: the model reads {names}, not "
                f"{', '.join(sorted(m.value for m in extra))}"
            )

    def predict(self, samples: Sequence[Sample]) -> list[Prediction]:
        """Predictions for `samples`, in their order."""
        for sample in samples:
            self.check(sample)
        groups: dict[Presence, list[int]] = {}
        for index, sample in enumerate(samples):
            groups.setdefault(sample.presence, []).append(index)
        results: list[Prediction | None] = [None] * len(samples)
        for presence, indices in groups.items():
            choice = self.select(presence)
            model = self.models[choice]
            # Similar lengths in one batch: less padding in the text tower.
            indices = sorted(indices, key=lambda i: _text_length(samples[i]), reverse=True)
            for chunk in _chunks(indices, self.batch_size):
                logits = self._forward(model, [samples[i] for i in chunk])
                for i, row in zip(chunk, logits):
                    results[i] = Prediction(samples[i].id, presence, row, choice)
        return [r for r in results if r is not None]

    def predict_rows(self, samples: Sequence[Sample]) -> list[dict[str, Any]]:
        """`predict` as JSON-ready rows (see `Prediction.to_row`)."""
        names = self.label_names
        return [p.to_row(self.task_type, names) for p in self.predict(samples)]

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    @torch.inference_mode()
    def _forward(self, model: MissingModalityModel, samples: Sequence[Sample]) -> torch.Tensor:
        from mllm_missing.training.data import SplitData, embed_rows

        model.eval()
        n = len(samples)
        presence = torch.tensor([s.presence.flags() for s in samples], dtype=torch.bool)
        rows = [{m.value: s.payloads.get(m) for m in MODALITY_ORDER} for s in samples]
        keys = {
            m: [_payload_key(s.payloads[m]) if m in s.presence else "" for s in samples]
            for m in model.modalities
        }
        split = SplitData("requests", rows, [s.id for s in samples], torch.zeros(n), presence, keys)
        with self._autocast():
            for m in model.modalities:
                if not model.strategy.adapts(m):
                    split.features[m] = self._frozen_features(model, m, samples, presence)
                elif model.strategy.retrieves:  # its retrieval queries are frozen embeddings
                    split.frozen[m] = self._frozen_features(model, m, samples, presence)
            embeddings = embed_rows(model, split, torch.arange(n))
            embeddings = {m: x.float() for m, x in embeddings.items()}
            logits = model(embeddings, presence.to(self.device))
        return logits.float().cpu()

    def _frozen_features(
        self,
        model: MissingModalityModel,
        modality: Modality,
        samples: Sequence[Sample],
        presence: torch.Tensor,
    ) -> torch.Tensor:
        """Frozen embeddings of a tower (one the strategy does not adapt, or any tower for a
        strategy that retrieves): each distinct input once, zeros on absent rows (the imputation
        fills them), as `load_split` caches them."""
        column = presence[:, MODALITY_ORDER.index(modality)]
        dim = model.backbone.embed_dim(modality)
        out = torch.zeros(len(samples), dim)
        present = column.nonzero().flatten().tolist()
        if not present:
            return out
        unique: dict[str, int] = {}
        raws: list[Any] = []
        where: list[int] = []
        for i in present:
            payload = samples[i].payloads[modality]
            key = _payload_key(payload)
            if key not in unique:
                unique[key] = len(raws)
                raws.append(payload)
            where.append(unique[key])
        encoded = model.backbone.embed(modality, raws).float().cpu()
        out[torch.tensor(present)] = encoded[torch.tensor(where)]
        return out


def _chunks(values: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _model_device(model: MissingModalityModel) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def _autocast_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else None
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    allowed = (torch.bfloat16, torch.float16, torch.float32)
    if resolved not in allowed:
        raise ConfigError(f"dtype must be one of bfloat16, float16, float32; got {dtype!r}")
    return None if resolved == torch.float32 else resolved
