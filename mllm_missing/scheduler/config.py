"""Configuration of a discrete scheduler: which kind, which task, which modules it may choose."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from mllm_missing.errors import ConfigError

__all__ = ["PROMPT_CHOICES", "SCHEDULER_KINDS", "Option", "SchedulerConfig"]

#: The kinds of scheduler.
SCHEDULER_KINDS = ("fixed", "llm", "rule")
#: What an LLM backbone is told about absent modalities: its learned (missing-aware) prompts, or
#: the MissRAG status text ("Input modality status: image: missing; text: present.").
PROMPT_CHOICES = ("learned", "status_text")


@dataclass(frozen=True)
class Option:
    """One thing a scheduler can choose: an imputation, a fusion and (LLM backbones) a prompt.

    A model without imputation and fusion modules (the projector VLM) chooses its prompt alone:
    ``Option(None, None, "status_text")``, named ``status_text``.

    Attributes:
        imputation: an imputation name registered in `IMPUTATIONS` (None: prompt only).
        fusion: a fusion name registered in `FUSIONS` (None: prompt only).
        prompt: ``learned`` or ``status_text`` for LLM backbones; None where there is no choice.
    """

    imputation: str | None
    fusion: str | None
    prompt: str | None = None

    def __post_init__(self) -> None:
        if (self.imputation is None) != (self.fusion is None):
            raise ConfigError(
                f"an option names both an imputation and a fusion or neither; got "
                f"imputation={self.imputation!r}, fusion={self.fusion!r}"
            )
        if self.imputation is None and self.prompt is None:
            raise ConfigError("an option without imputation and fusion must name a prompt")

    @property
    def name(self) -> str:
        """``imputation+fusion``, ``imputation+fusion+prompt`` or ``prompt`` (the name the LLM
        answers)."""
        parts = (self.imputation, self.fusion, self.prompt)
        return "+".join(p for p in parts if p is not None)

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, text: str, field: str = "option") -> Option:
        """Read ``imputation+fusion[+prompt]`` or a prompt alone (``learned``,
        ``status_text``), checking every part against the registries.

        Raises:
            ConfigError: naming `field`, the bad part and the allowed values.
        """
        from mllm_missing.strategies.fusion import FUSIONS
        from mllm_missing.strategies.imputation import IMPUTATIONS

        parts = str(text).split("+")
        if len(parts) == 1 and parts[0] in PROMPT_CHOICES:
            return cls(None, None, parts[0])
        if len(parts) not in (2, 3):
            raise ConfigError(
                f"{field} must look like IMPUTATION+FUSION[+PROMPT] (e.g. zero+concat) or a "
                f"prompt alone ({', '.join(PROMPT_CHOICES)}); got {text!r}"
            )
        imputation, fusion = parts[0], parts[1]
        prompt = parts[2] if len(parts) == 3 else None
        _check_names(f"{field} imputation", (imputation,), IMPUTATIONS.names())
        _check_names(f"{field} fusion", (fusion,), FUSIONS.names())
        if prompt is not None:
            _check_names(f"{field} prompt", (prompt,), PROMPT_CHOICES)
        return cls(imputation, fusion, prompt)


def _check_names(field: str, values: tuple[str, ...], allowed: list[str] | tuple[str, ...]) -> None:
    for value in values:
        if value not in allowed:
            raise ConfigError(f"{field} must be one of {', '.join(allowed)}; got {value!r}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Settings of a discrete scheduler.

    Args:
        kind: ``llm`` (a chat LLM ranks the options by log-likelihood), ``rule`` (best
            validation score per presence pattern) or ``fixed`` (one option for every pattern).
        task: a one-line description of the task, shown to the LLM and part of the cache key.
        modalities: the modalities a complete input has (for the status text).
        imputations: imputations the scheduler may choose (default: every registered one).
        fusions: fusions it may choose (default: every registered one).
        prompts: prompt choices for LLM backbones (``learned``, ``status_text``); empty: the
            backbone has no prompt choice.
        options: explicit allowed options ``imputation+fusion[+prompt]`` (e.g. the trained
            checkpoints), or prompts alone (``learned``, ``status_text``: a VLM with no
            imputation / fusion modules); when given, they replace the product of the three
            lists above.
        fixed: the option of the ``fixed`` kind.
        llm: the ``llm`` kind's model: ``smollm2-135m-instruct`` (offline package) or a local
            transformers checkpoint folder / GGUF file.
        reduction: how an option's token log-likelihoods are combined, ``mean`` or ``sum``.
        calibrate: rank options by their log-likelihood minus that given the option list
            alone (removes the LLM's prior for some names; two scoring passes per decision).
    """

    kind: str = "rule"
    task: str = "classify the input"
    modalities: tuple[str, ...] = ("image", "text")
    imputations: tuple[str, ...] = ()
    fusions: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    fixed: str | None = None
    llm: str = "smollm2-135m-instruct"
    reduction: str = "mean"
    calibrate: bool = True

    def __post_init__(self) -> None:
        from mllm_missing.strategies.fusion import FUSIONS
        from mllm_missing.strategies.imputation import IMPUTATIONS
        from mllm_missing.types import Modality

        for name in ("modalities", "imputations", "fusions", "prompts", "options"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        if self.kind not in SCHEDULER_KINDS:
            raise ConfigError(
                f"kind must be one of {', '.join(SCHEDULER_KINDS)}; got {self.kind!r}"
            )
        if not isinstance(self.task, str) or not self.task.strip():
            raise ConfigError("task must be a non-empty description of the task")
        if not self.modalities:
            raise ConfigError("modalities must name at least one modality")
        _check_names("modalities", self.modalities, [m.value for m in Modality])
        _check_names("imputations", self.imputations, IMPUTATIONS.names())
        _check_names("fusions", self.fusions, FUSIONS.names())
        _check_names("prompts", self.prompts, PROMPT_CHOICES)
        for option in self.options:
            Option.parse(option, field="options")
        if self.reduction not in ("mean", "sum"):
            raise ConfigError(f"reduction must be one of mean, sum; got {self.reduction!r}")
        if not isinstance(self.calibrate, bool):
            raise ConfigError(f"calibrate must be true or false; got {self.calibrate!r}")
        if self.kind == "llm" and not str(self.llm).strip():
            raise ConfigError("llm must name a preset (smollm2-135m-instruct) or a local path")
        if self.kind == "fixed":
            if self.fixed is None:
                raise ConfigError("fixed: the fixed kind needs an option, e.g. fixed=zero+concat")
            allowed = [o.name for o in self.allowed_options()]
            chosen = Option.parse(self.fixed, field="fixed").name
            if chosen not in allowed:
                raise ConfigError(f"fixed must be one of {', '.join(allowed)}; got {self.fixed!r}")

    def allowed_options(self) -> list[Option]:
        """Every option the scheduler may return, in a stable order."""
        from mllm_missing.strategies.fusion import FUSIONS
        from mllm_missing.strategies.imputation import IMPUTATIONS

        if self.options:
            parsed = [Option.parse(o, field="options") for o in self.options]
            return list(dict.fromkeys(parsed))
        imputations = self.imputations or tuple(IMPUTATIONS.names())
        fusions = self.fusions or tuple(FUSIONS.names())
        prompts: tuple[str | None, ...] = self.prompts or (None,)
        return [Option(i, f, p) for i, f, p in itertools.product(imputations, fusions, prompts)]
