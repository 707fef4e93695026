"""What answers a chat turn: a trained classifier checkpoint or a generative (V)LM, behind one
small protocol.

An `Answerer` says which modalities it reads and whether it runs imputation + fusion modules a
scheduler can choose (`uses_modules`), and answers one `Sample` (only the present modalities
carry payloads), sending pieces of the answer to ``emit`` as they are computed.

- `ClassifierAnswerer`: a `MissingModalityModel` (e.g. `load_checkpoint` of an easy-VQA run)
  through the `InferenceEngine`; the answer is the best label and its probability,
  ``"circle (82 %)"``. The scheduler's `ModuleChoice` picks which loaded model runs.
- `GenerativeAnswerer`: any ``generate(question, image, stream) -> str`` function, e.g. a
  `FrozenCausalLM` (text only, `from_causal_lm`) or a `ProjectorVLM` (image + text,
  `from_projector_vlm`); both stream tokens.
- `VLMAnswerer`: a `MissingAwareVLM` (the easy-VQA projector recipe's checkpoint) whose way of
  telling the LM that the image is absent is the scheduler's choice: the learned missing-image
  tokens (``learned``) or the status line (``status_text``). It streams tokens.

An answerer may also have ``needs_choice(presence) -> bool``: whether the scheduler is asked for
that presence pattern (default: `uses_modules`). The VLM has a choice only when its image is
absent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from mllm_missing.chat.inputs import ChatInputError
from mllm_missing.errors import ConfigError
from mllm_missing.inference.engine import InferenceEngine, ModuleChoice, model_choice
from mllm_missing.types import Modality, Presence, Sample

__all__ = ["Answerer", "ClassifierAnswerer", "Emit", "GenerativeAnswerer", "VLMAnswerer"]

#: What a `VLMAnswerer` can be told to do for an absent image (`MissingAwareVLM.generate`'s
#: ``missing_prompt``; the scheduler's `PROMPT_CHOICES`).
VLM_PROMPTS = ("learned", "status_text")

#: Receives each piece of an answer as it is produced.
Emit = Callable[[str], None]


@runtime_checkable
class Answerer(Protocol):
    """Answers one chat turn.

    Attributes:
        modalities: the inputs it reads (others given in a turn are reported as ignored).
        uses_modules: whether a scheduler's `ModuleChoice` (modules, or a prompt) applies to it.
    """

    modalities: frozenset[Modality]
    uses_modules: bool

    def default_choice(self) -> ModuleChoice | None:
        """The modules it runs when no scheduler is given (None: it has none)."""
        ...

    def answer(self, sample: Sample, choice: ModuleChoice | None, emit: Emit) -> str:
        """The answer to `sample` with modules `choice`; pieces go to `emit` as they come."""
        ...


class ClassifierAnswerer:
    """A trained classifier (a `MissingModalityModel`) as a chat answerer.

    Args:
        model: the trained model (easy-VQA: 13 answers).
        candidates: more trained models of the same task, by their modules, that a scheduler
            may choose.
        device: where inputs go (default: the model's device).
    """

    uses_modules = True

    def __init__(
        self,
        model: Any,
        *,
        candidates: Mapping[ModuleChoice, Any] | None = None,
        device: str | None = None,
    ) -> None:
        self.model = model
        self.models: dict[ModuleChoice, Any] = {model_choice(model): model, **(candidates or {})}
        self.modalities = frozenset(model.modalities)
        self.device = device
        self._engines: dict[ModuleChoice, InferenceEngine] = {}

    def default_choice(self) -> ModuleChoice:
        """The modules the model was trained with."""
        return model_choice(self.model)

    def _engine(self, choice: ModuleChoice) -> InferenceEngine:
        if choice.prompt is not None:
            raise ConfigError(
                f"the scheduler chose {choice}, but a classifier has no prompt choice; schedule "
                "imputation+fusion options only"
            )
        if choice not in self._engines:
            if choice not in self.models:
                known = ", ".join(str(c) for c in self.models)
                raise ChatInputError(f"the scheduler chose {choice}, but only {known} is loaded")
            others = {c: m for c, m in self.models.items() if c != choice}
            self._engines[choice] = InferenceEngine(
                self.models[choice], batch_size=1, device=self.device, candidates=others
            )
        return self._engines[choice]

    def answer(self, sample: Sample, choice: ModuleChoice | None, emit: Emit) -> str:
        """``"label (p %)"`` for multiclass / binary tasks, the labels at p >= 0.5 for
        multilabel ones."""
        engine = self._engine(choice or self.default_choice())
        row = engine.predict_rows([sample])[0]["prediction"]
        scores: dict[str, float] = row["scores"]
        if "label" in row:
            label = row["label"]
            score = scores.get(label, 1.0 - next(iter(scores.values())))
            text = f"{label} ({100 * score:.0f} %)"
        else:
            labels = row["labels"] or []
            text = ", ".join(f"{n} ({100 * scores[n]:.0f} %)" for n in labels) or "(no label)"
        emit(text)
        return text


class GenerativeAnswerer:
    """A generative LM or VLM as a chat answerer.

    Args:
        generate: ``generate(question, image, stream) -> answer``; `image` is a PIL image or
            None, `stream` a callback for pieces of text (call it with the whole answer if the
            model cannot stream).
        modalities: what it reads (text only: ``{TEXT}``; a VLM: ``{IMAGE, TEXT}``).
    """

    uses_modules = False

    def __init__(
        self,
        generate: Callable[[str, Any, Emit], str],
        modalities: frozenset[Modality] = frozenset({Modality.TEXT}),
    ) -> None:
        self.generate = generate
        self.modalities = frozenset(modalities)

    @classmethod
    def from_causal_lm(cls, lm: Any, max_new_tokens: int = 128) -> GenerativeAnswerer:
        """A text-only answerer from a `FrozenCausalLM` (e.g. `load_smollm2()`); streams tokens."""

        def generate(question: str, image: Any, stream: Emit) -> str:
            del image
            return str(lm.generate(question, max_new_tokens=max_new_tokens, stream=stream))

        return cls(generate, frozenset({Modality.TEXT}))

    @classmethod
    def from_projector_vlm(cls, vlm: Any, max_new_tokens: int = 32) -> GenerativeAnswerer:
        """An image + text answerer from a `ProjectorVLM`; streams tokens (an absent image
        gets the plain text-only prompt; `VLMAnswerer` for a `MissingAwareVLM`)."""

        def generate(question: str, image: Any, stream: Emit) -> str:
            return str(vlm.generate(question, image, max_new_tokens=max_new_tokens, stream=stream))

        return cls(generate, frozenset({Modality.IMAGE, Modality.TEXT}))

    def default_choice(self) -> None:
        """None: a generative model has no imputation / fusion modules to choose."""
        return None

    def answer(self, sample: Sample, choice: ModuleChoice | None, emit: Emit) -> str:
        """The model's answer; a turn with no text asks it to describe the image."""
        del choice
        question = sample.payloads.get(Modality.TEXT) or "Describe the image."
        return self.generate(question, sample.payloads.get(Modality.IMAGE), emit)


class VLMAnswerer:
    """A `MissingAwareVLM` as a chat answerer: the scheduler picks, when the image is absent,
    how the LM is told so.

    The scheduler's choice is a prompt alone (``ModuleChoice(None, None, "status_text")``):
    ``learned`` puts the learned missing-image tokens where the image tokens go, ``status_text``
    puts the status line "Input modality status: image: missing; text: present." before the
    question instead (`MissingAwareVLM.generate`'s ``missing_prompt``). With the image present
    there is nothing to choose and the scheduler is not asked.

    Args:
        vlm: the trained model (e.g. `mllm_missing.training.vlm.load_trained_vlm`).
        max_new_tokens: answer length limit.
        default_prompt: the prompt when no scheduler is given (``learned``: what it was trained
            with).

    Raises:
        ConfigError: an unknown `default_prompt`.
    """

    uses_modules = True

    def __init__(self, vlm: Any, *, max_new_tokens: int = 32, default_prompt: str = "learned"):
        if default_prompt not in VLM_PROMPTS:
            raise ConfigError(
                f"default_prompt must be one of {', '.join(VLM_PROMPTS)}; got {default_prompt!r}"
            )
        self.vlm = vlm
        self.max_new_tokens = max_new_tokens
        self.default_prompt = default_prompt
        self.modalities = frozenset({Modality.IMAGE, Modality.TEXT})

    def default_choice(self) -> ModuleChoice:
        """`default_prompt`, with no imputation or fusion module."""
        return ModuleChoice(None, None, self.default_prompt)

    def needs_choice(self, presence: Presence) -> bool:
        """True when the image is absent: only then does the prompt choice change the input."""
        return Modality.IMAGE not in presence

    def answer(self, sample: Sample, choice: ModuleChoice | None, emit: Emit) -> str:
        """The VLM's answer, streamed token by token; a turn with no text asks it to describe
        the image.

        Raises:
            ConfigError: the image is absent and `choice` names no prompt this VLM has.
        """
        image = sample.payloads.get(Modality.IMAGE)
        prompt = self.default_prompt
        if image is None and choice is not None:
            if choice.prompt not in VLM_PROMPTS:
                raise ConfigError(
                    f"the scheduler chose {choice}, but this VLM takes a prompt choice "
                    f"({', '.join(VLM_PROMPTS)}); give the scheduler options "
                    f"{', '.join(VLM_PROMPTS)}"
                )
            prompt = str(choice.prompt)
        question = sample.payloads.get(Modality.TEXT) or "Describe the image."
        return str(
            self.vlm.generate(
                question, image, max_new_tokens=self.max_new_tokens, missing_prompt=prompt,
                stream=emit,
            )
        )  # fmt: skip
