"""A chat session with partial inputs: text, an image, audio, or any subset, one turn at a time.

`ChatSession.ask` reads the turn's inputs (refusing bad ones with a clear message, see
`mllm_missing.chat.inputs`), turns audio into text with Whisper tiny.en when the answerer does
not read audio itself, asks the scheduler which modules to run for the turn's presence pattern
(once per pattern, as the inference engine does), and returns a `ChatTurn` saying what was used,
what was missing and what the scheduler chose: the imputation + fusion modules of a classifier,
or for the missing-aware VLM how the LM is told that the image is absent (its prompt).

Streaming: ``ask(..., stream=callback)`` calls ``callback(piece)`` with each piece of the reply
as it is computed (the answer, or each generated token for a generative answerer, then the
status line, each ending where the printed reply should); the pieces joined are
`ChatTurn.render()`. The return value is the finished `ChatTurn` either way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from mllm_missing.chat.answerers import Answerer, Emit
from mllm_missing.chat.inputs import (
    ChatInputError,
    ChatLimits,
    Transcriber,
    WhisperTranscriber,
    read_audio,
    read_image,
)
from mllm_missing.errors import MllmMissingError
from mllm_missing.inference.engine import FixedSelector, ModuleChoice, ModuleSelector
from mllm_missing.types import (
    MODALITY_ORDER,
    Modality,
    Presence,
    Sample,
    is_empty_payload,
    status_text,
)

__all__ = ["ChatSession", "ChatTurn"]

logger = logging.getLogger(__name__)

_DASH = "\u2014"


@dataclass
class ChatTurn:
    """One question and its answer.

    Attributes:
        answer: the answer text ("" when the turn was refused).
        used: the inputs the answer used, in order image, text, audio.
        missing: the answerer's inputs this turn lacked (the imputation filled them).
        ignored: inputs given that the answerer cannot read.
        modules: the imputation + fusion (+ prompt) that ran (None: the answerer has no
            modules).
        prompt: a VLM's prompt choice for the absent image, ``learned`` or ``status_text``
            (None: no prompt was chosen, e.g. nothing was missing).
        scheduler: the scheduler's name.
        rationale: the scheduler's reason for its choice, if it gave one.
        question: the text the answerer read (typed text, a transcript, or both).
        transcript: what Whisper heard in the audio, if audio was given.
        notes: how inputs were combined or handled (e.g. text + transcript).
        error: why the turn was refused (None: answered).
    """

    answer: str = ""
    used: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    modules: str | None = None
    prompt: str | None = None
    scheduler: str | None = None
    rationale: str | None = None
    question: str | None = None
    transcript: str | None = None
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when the turn was answered."""
        return self.error is None

    def status_line(self) -> str:
        """``used: image, text; missing: —; modules: zero+concat (scheduler: fixed)``, or for a
        VLM ``used: text; missing: image; prompt: status_text (scheduler: llm)``."""
        parts = [
            f"used: {', '.join(self.used) or _DASH}",
            f"missing: {', '.join(self.missing) or _DASH}",
        ]
        if self.ignored:
            parts.append(f"ignored: {', '.join(self.ignored)}")
        if self.modules is not None:
            parts.append(f"modules: {self.modules} (scheduler: {self.scheduler})")
        elif self.prompt is not None:
            parts.append(f"prompt: {self.prompt} (scheduler: {self.scheduler})")
        return "; ".join(parts)

    def detail_lines(self) -> list[str]:
        """The transcript, the scheduler's rationale and the notes, one line each."""
        lines = [f'heard: "{self.transcript}"'] if self.transcript is not None else []
        if self.rationale:
            lines.append(f"why: {self.rationale}")
        lines += [f"note: {n}" for n in self.notes]
        return lines

    def render(self) -> str:
        """The reply as printed: the answer, then the status and detail lines."""
        if self.error is not None:
            return f"error: {self.error}\n"
        return "\n".join([self.answer, self.status_line(), *self.detail_lines()]) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field plus ``status`` (the status line)."""
        out = {k: v for k, v in self.__dict__.items()}
        out["status"] = self.status_line() if self.ok else None
        return out


def _stood_in(choice: ModuleChoice | None, presence: Presence) -> str:
    """What stood in for the missing inputs, as the end of a note (``""``: nothing said)."""
    if choice is None:
        return ""
    if choice.imputation is not None:
        return f": {choice.imputation} imputation stood in"
    if choice.prompt == "learned":
        return ": the learned missing-aware prompt stood in"
    if choice.prompt == "status_text":
        return f': the LM was told so in text ("{status_text(presence)}")'
    return ""


def _scheduler_name(scheduler: Any) -> str:
    for attribute in ("name", "kind"):  # kind: mllm_missing.scheduler's llm / rule / fixed
        name = getattr(scheduler, attribute, None)
        if isinstance(name, str) and name:
            return name
    if isinstance(scheduler, FixedSelector):
        return "fixed"
    return type(scheduler).__name__


class ChatSession:
    """Question answering over partial inputs with one answerer.

    Args:
        answerer: a `ClassifierAnswerer` (trained checkpoint), `VLMAnswerer` (missing-aware
            VLM) or `GenerativeAnswerer`.
        scheduler: any `ModuleSelector` (``presence -> ModuleChoice``), asked once per presence
            pattern the answerer has a choice for (its ``needs_choice``; default: every pattern
            when it `uses_modules`); default: the answerer's own modules (a VLM: its ``learned``
            prompt) for every pattern. It may explain its
            choice: a ``decide(presence)`` method returning an object with ``choice`` and
            ``rationale`` (`mllm_missing.scheduler`'s schedulers), a ``rationale`` attribute on
            the returned choice, or an ``explain(presence) -> str`` method. ``scheduler.name``
            (or ``.kind``) names it in the replies.
        transcriber: audio -> text (default: Whisper tiny.en, loaded on the first audio).
        limits: input size limits.
    """

    def __init__(
        self,
        answerer: Answerer,
        scheduler: ModuleSelector | None = None,
        transcriber: Transcriber | None = None,
        limits: ChatLimits | None = None,
    ) -> None:
        self.answerer = answerer
        default = answerer.default_choice()
        if scheduler is None and default is not None:
            scheduler = FixedSelector(default)
        self.scheduler = scheduler
        self.transcriber: Transcriber = transcriber or WhisperTranscriber()
        self.limits = limits or ChatLimits()
        self.history: list[ChatTurn] = []
        self._choices: dict[Presence, tuple[ModuleChoice, str | None]] = {}

    def clear(self) -> None:
        """Forget the turns so far."""
        self.history.clear()

    def ask(
        self,
        text: str | None = None,
        image: Any = None,
        audio: Any = None,
        stream: Emit | None = None,
    ) -> ChatTurn:
        """Answer one turn; any of `text`, `image`, `audio` may be missing, not all of them.

        Args:
            text: the typed question.
            image: an image path, its bytes, or a PIL image.
            audio: an audio file path, its bytes, or a mono 16 kHz waveform.
            stream: called with each piece of the reply as it is computed (see the module
                docstring).

        Returns:
            The turn; a refused turn (bad or no input) has `ChatTurn.error` set and the
            session goes on.
        """
        emit: Emit = stream or (lambda piece: None)
        turn = ChatTurn()
        try:
            self._answer(turn, text, image, audio, emit)
        except MllmMissingError as exc:
            turn.answer, turn.error = "", str(exc)
            emit(turn.render())
        self.history.append(turn)
        return turn

    def _answer(self, turn: ChatTurn, text: Any, image: Any, audio: Any, emit: Emit) -> None:
        given = {
            Modality.IMAGE: not is_empty_payload(image),
            Modality.TEXT: not is_empty_payload(text),
            Modality.AUDIO: not is_empty_payload(audio),
        }
        if not any(given.values()):
            raise ChatInputError("nothing to answer: type a question, or attach an image or audio")
        reads = self.answerer.modalities
        payloads: dict[Modality, Any] = {}
        if given[Modality.TEXT]:
            if not isinstance(text, str):
                raise ChatInputError(f"text must be a string; got {type(text).__name__}")
            if len(text) > self.limits.max_text_chars:
                raise ChatInputError(
                    f"the question is too long ({len(text):,} characters; the limit is "
                    f"{self.limits.max_text_chars:,})"
                )
            payloads[Modality.TEXT] = text.strip()
        if given[Modality.IMAGE]:
            picture = read_image(image, self.limits)
            if Modality.IMAGE in reads:
                payloads[Modality.IMAGE] = picture
        if given[Modality.AUDIO]:
            self._audio(turn, read_audio(audio, self.limits), payloads)
        for m in MODALITY_ORDER:
            if given[m] and m not in reads and not (m is Modality.AUDIO and turn.transcript):
                turn.ignored.append(m.value)
        turn.used = [m.value for m in MODALITY_ORDER if given[m] and m.value not in turn.ignored]
        present = [m for m in MODALITY_ORDER if m in payloads and m in reads]
        turn.missing = [m.value for m in MODALITY_ORDER if m in reads and m not in present]
        if not present:
            readable = ", ".join(m.value for m in MODALITY_ORDER if m in reads)
            why = (
                "the audio held no words Whisper could hear, and " if turn.transcript == "" else ""
            )
            raise ChatInputError(
                f"{why}nothing this model can read was given (it reads {readable})"
            )
        turn.question = payloads.get(Modality.TEXT)
        sample = Sample(Presence(frozenset(present)), {m: payloads[m] for m in present})
        choice: ModuleChoice | None = None
        if self.scheduler is not None and self._needs_choice(sample.presence):
            choice, turn.rationale = self._choose(sample.presence)
            turn.scheduler = _scheduler_name(self.scheduler)
            if choice.imputation is not None:
                turn.modules = str(choice)
            turn.prompt = choice.prompt
        if turn.missing:
            absent = " and ".join(f"the {m}" for m in turn.missing)
            how = _stood_in(choice, sample.presence)
            turn.notes.append(
                f"{absent} {'was' if len(turn.missing) == 1 else 'were'} missing{how}"
            )
        turn.answer = self.answerer.answer(sample, choice, emit)
        emit("\n" + "\n".join([turn.status_line(), *turn.detail_lines()]) + "\n")

    def _audio(self, turn: ChatTurn, waveform: Any, payloads: dict[Modality, Any]) -> None:
        """Audio goes in as audio when the answerer reads it, else as its transcript."""
        if Modality.AUDIO in self.answerer.modalities:
            payloads[Modality.AUDIO] = waveform
            return
        if Modality.TEXT not in self.answerer.modalities:
            return  # reported as ignored
        try:
            heard = self.transcriber(waveform).strip()
        except MllmMissingError:
            raise
        except (ImportError, OSError, RuntimeError, ValueError) as exc:
            raise ChatInputError(f"could not transcribe the audio ({exc})") from None
        turn.transcript = heard
        if not heard:
            turn.notes.append("the audio held no words Whisper could hear")
            return
        typed = payloads.get(Modality.TEXT)
        if typed:
            payloads[Modality.TEXT] = f"{typed} {heard}"
            turn.notes.append("question = typed text, then the audio's transcript")
        else:
            payloads[Modality.TEXT] = heard
            turn.notes.append("question = the audio's transcript")

    def _needs_choice(self, presence: Presence) -> bool:
        needs = getattr(self.answerer, "needs_choice", None)
        return bool(needs(presence)) if callable(needs) else bool(self.answerer.uses_modules)

    def _choose(self, presence: Presence) -> tuple[ModuleChoice, str | None]:
        if presence not in self._choices:
            assert self.scheduler is not None
            decide = getattr(self.scheduler, "decide", None)
            if callable(decide):  # mllm_missing.scheduler: a Decision with its rationale
                decision = decide(presence)
                choice, rationale = decision.choice, getattr(decision, "rationale", None)
            else:
                choice = self.scheduler(presence)
                rationale = getattr(choice, "rationale", None)
                explain = getattr(self.scheduler, "explain", None)
                if rationale is None and callable(explain):
                    rationale = explain(presence)
            self._choices[presence] = (choice, rationale)
        return self._choices[presence]
