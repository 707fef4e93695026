"""ChatSession: answers with any subset of inputs, reports used / missing / modules, streams, and
refuses bad input with a clear message while the session goes on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mllm_missing.chat import ChatLimits, ChatSession, ClassifierAnswerer, GenerativeAnswerer
from mllm_missing.inference.engine import InferenceEngine, ModuleChoice, fixed_selector
from mllm_missing.types import Modality, Presence, Sample


def test_image_and_text_answer_matches_the_engine(session: Any, files: dict[str, Path]) -> None:
    turn = session.ask("what shape is it", image=files["png"])
    assert turn.ok and turn.used == ["image", "text"] and turn.missing == []
    assert turn.modules == "zero+concat" and turn.scheduler == "fixed"
    assert turn.status_line() == "used: image, text; missing: \u2014; modules: zero+concat " \
        "(scheduler: fixed)"  # fmt: skip
    # The answer is the engine's best label with its probability.
    image = Image.open(files["png"]).convert("RGB")
    sample = Sample(Presence.of("image", "text"), {"image": image, "text": "what shape is it"})
    row = InferenceEngine(session.answerer.model).predict_rows([sample])[0]["prediction"]
    assert turn.answer == f"{row['label']} ({100 * row['scores'][row['label']]:.0f} %)"


def test_missing_image_is_said_and_changes_the_input(session: Any, files: dict[str, Path]) -> None:
    assert session.ask("what shape is it", image=files["png"]).missing == []
    text_only = session.ask("what shape is it")
    assert text_only.ok and text_only.used == ["text"] and text_only.missing == ["image"]
    assert "missing: image" in text_only.status_line()
    assert "the image was missing: zero imputation stood in" in text_only.notes
    image_only = session.ask(image=files["png"])
    assert image_only.used == ["image"] and image_only.missing == ["text"]
    assert len(session.history) == 3


def test_streaming_pieces_join_to_the_rendered_reply(session: Any, files: dict[str, Path]) -> None:
    pieces: list[str] = []
    turn = session.ask("what shape is it", image=files["png"], stream=pieces.append)
    assert len(pieces) == 2 and pieces[0] == turn.answer
    assert "".join(pieces) == turn.render()
    bad: list[str] = []
    refused = session.ask(stream=bad.append)
    assert "".join(bad) == refused.render() == f"error: {refused.error}\n"


def test_audio_is_transcribed_and_combined(
    session: Any, transcriber: Any, files: dict[str, Path]
) -> None:
    spoken = session.ask(audio=files["wav"], image=files["png"])
    assert spoken.ok and spoken.used == ["image", "audio"] and spoken.missing == []
    assert spoken.question == "what shape is in the image"
    assert spoken.transcript == "what shape is in the image"
    assert "question = the audio's transcript" in spoken.notes
    assert transcriber.calls[0].shape == (16000,)
    both = session.ask("please tell me:", audio=files["wav"])
    assert both.question == "please tell me: what shape is in the image"
    assert both.missing == ["image"] and "typed text, then the audio's transcript" in both.notes[0]
    assert 'heard: "what shape is in the image"' in both.render()


def test_silent_transcript_alone_is_refused(tiny_model: Any, files: dict[str, Path]) -> None:
    session = ChatSession(ClassifierAnswerer(tiny_model), transcriber=lambda w: "")
    turn = session.ask(audio=files["wav"])
    assert not turn.ok and "no words" in (turn.error or "")


class Explaining:
    """A scheduler with a name and a reason, choosing by presence."""

    name = "rules"

    def __init__(self) -> None:
        self.asked: list[str] = []

    def __call__(self, presence: Presence) -> ModuleChoice:
        self.asked.append(presence.pattern)
        return ModuleChoice("zero", "concat")

    def explain(self, presence: Presence) -> str:
        return f"{presence.pattern}: the trained modules"


def test_scheduler_choice_and_rationale_are_reported_once_per_pattern(
    tiny_model: Any, files: dict[str, Path]
) -> None:
    scheduler = Explaining()
    session = ChatSession(ClassifierAnswerer(tiny_model), scheduler=scheduler)
    for _ in range(2):
        turn = session.ask("what shape", image=files["png"])
        session.ask("what shape")
    assert scheduler.asked == ["image+text", "text"]
    assert turn.scheduler == "rules" and turn.rationale == "image+text: the trained modules"
    assert "why: image+text: the trained modules" in turn.render()


def test_a_choice_that_is_not_loaded_is_a_message(tiny_model: Any) -> None:
    session = ChatSession(ClassifierAnswerer(tiny_model), scheduler=fixed_selector("knn", "late"))
    turn = session.ask("what shape")
    assert not turn.ok and "the scheduler chose knn+late, but only zero+concat" in str(turn.error)
    assert session.ask("again").error == turn.error  # still going


@pytest.mark.parametrize(
    "inputs,message",
    [
        ({}, "nothing to answer: type a question, or attach an image or audio"),
        ({"text": "   "}, "nothing to answer"),
        ({"text": "q", "image": "{tmp}/nope.png"}, "image file not found: {tmp}/nope.png"),
        ({"text": "q", "image": "{txt}"}, "image {txt}: not an image"),
        ({"text": "q", "image": "{broken}"}, "image {broken}: cannot read it as an image"),
        ({"text": "q", "image": "{empty}"}, "image {empty} is empty (0 bytes)"),
        ({"text": "q", "audio": "{txt}"}, "audio {txt}: not a readable audio file"),
        ({"text": "q", "audio": "{png}"}, "audio {png}: not a readable audio file"),
        ({"text": "q", "audio": "{tmp}/gone.wav"}, "audio file not found: {tmp}/gone.wav"),
        ({"text": "q", "image": "{tmp}"}, "image {tmp}: not a file"),
        ({"text": "x" * 2001}, "the question is too long (2,001 characters; the limit is 2,000)"),
        ({"text": "q", "image": b"\x00junk"}, "the uploaded image: not an image"),
    ],
    ids=["empty", "blank", "no-image-file", "text-as-image", "truncated-png", "empty-file",
         "text-as-audio", "png-as-audio", "no-audio-file", "folder", "long-text", "junk-bytes"],
)  # fmt: skip
def test_bad_input_is_a_clear_message_and_the_session_goes_on(
    session: Any, files: dict[str, Path], inputs: dict[str, Any], message: str
) -> None:
    names = {k: str(v) for k, v in files.items()} | {"tmp": str(files["png"].parent)}
    inputs = {k: v.format(**names) if isinstance(v, str) else v for k, v in inputs.items()}
    turn = session.ask(**inputs)
    assert not turn.ok and turn.answer == ""
    assert message.format(**names) in str(turn.error)
    assert session.ask("what shape is it", image=files["png"]).ok


def test_huge_files_are_refused_by_size(tiny_model: Any, files: dict[str, Path]) -> None:
    limits = ChatLimits(max_file_bytes=1000, max_image_pixels=500, max_audio_seconds=0.5)
    session = ChatSession(ClassifierAnswerer(tiny_model), transcriber=str, limits=limits)
    big = files["png"].parent / "big.png"
    big.write_bytes(b"\x89PNG" + bytes(5000))
    turn = session.ask("q", image=big)
    assert f"image {big} is too large (5,004 bytes; the limit is 1,000 bytes)" == turn.error
    assert "the uploaded image is too large" in str(session.ask("q", image=bytes(2000)).error)
    wide = files["png"].parent / "wide.png"
    Image.new("RGB", (40, 20)).save(wide)
    assert "(40x20 pixels; the limit is 500 pixels)" in str(session.ask("q", image=wide).error)
    long_audio = session.ask("q", audio=np.zeros(16000, dtype=np.float32))
    assert long_audio.error == "the audio is too long (1.0 s; the limit is 0.5 s)"
    assert session.ask("what shape").ok


def test_default_limit_is_documented_10_mb(session: Any, tmp_path: Path) -> None:
    huge = tmp_path / "huge.png"
    with huge.open("wb") as handle:
        handle.truncate(10 * 1024 * 1024 + 1)
    assert "too large (10.0 MB; the limit is 10.0 MB)" in str(session.ask("q", image=huge).error)


def test_generative_answerer_streams_tokens_and_reports_missing(files: dict[str, Path]) -> None:
    seen: list[tuple[str, Any]] = []

    def generate(question: str, image: Any, stream: Any) -> str:
        seen.append((question, image))
        for piece in ("A ", "red ", "circle."):
            stream(piece)
        return "A red circle."

    vlm = GenerativeAnswerer(generate, frozenset({Modality.IMAGE, Modality.TEXT}))
    session = ChatSession(vlm, transcriber=lambda w: "hello")
    pieces: list[str] = []
    turn = session.ask("what is it?", stream=pieces.append)
    assert pieces[:3] == ["A ", "red ", "circle."] and turn.answer == "A red circle."
    assert turn.missing == ["image"] and turn.modules is None
    assert turn.status_line() == "used: text; missing: image"
    assert "the image was missing" in turn.notes
    described = session.ask(image=files["png"])
    assert seen[-1][0] == "Describe the image." and isinstance(seen[-1][1], Image.Image)
    assert described.missing == ["text"]
    # a text-only LM ignores an image and says so
    text_lm = ChatSession(GenerativeAnswerer(lambda q, i, s: "ok"), transcriber=str)
    ignored = text_lm.ask("hi", image=files["png"])
    assert ignored.ignored == ["image"] and "ignored: image" in ignored.status_line()
    assert "nothing this model can read" in str(text_lm.ask(image=files["png"]).error)


def test_from_causal_lm_streams_the_lm_pieces() -> None:
    class LM:
        def generate(self, messages: Any, max_new_tokens: int, stream: Any) -> str:
            stream("Hel")
            stream("lo")
            return "Hello"

    pieces: list[str] = []
    turn = ChatSession(GenerativeAnswerer.from_causal_lm(LM())).ask("hi", stream=pieces.append)
    assert turn.answer == "Hello" and pieces[:2] == ["Hel", "lo"]


def test_waveform_input_and_clear(session: Any) -> None:
    turn = session.ask(audio=torch.zeros(8000) + 0.1)
    assert turn.ok and turn.transcript
    session.clear()
    assert session.history == []


def test_a_project_scheduler_reports_its_kind_and_rationale(
    tiny_model: Any, files: dict[str, Path]
) -> None:
    scheduler_package = pytest.importorskip("mllm_missing.scheduler")
    config = scheduler_package.SchedulerConfig(kind="fixed", fixed="zero+concat")
    scheduler = scheduler_package.build_scheduler(config)
    session = ChatSession(ClassifierAnswerer(tiny_model), scheduler=scheduler)
    turn = session.ask("what shape")
    assert turn.ok and turn.modules == "zero+concat" and turn.scheduler == "fixed"
    assert turn.rationale and "text" in turn.rationale
    assert f"why: {turn.rationale}" in turn.render()
