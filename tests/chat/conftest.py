"""Shared chat test setup: a tiny CLIP classifier, a fake transcriber and real input files."""

from __future__ import annotations

import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

LABELS = ["circle", "square", "triangle"]


@pytest.fixture(scope="session")
def tiny_model() -> Any:
    """A 3-label image + text classifier on a 2-layer CLIP (random weights), zero+concat."""
    pytest.importorskip("open_clip")
    from mllm_missing.strategies.testing import tiny_classifier

    return tiny_classifier(labels=LABELS)


class FakeTranscriber:
    """Hears `words` in any audio and records the waveforms it was given."""

    def __init__(self, words: str = "what shape is in the image") -> None:
        self.words = words
        self.calls: list[torch.Tensor] = []

    def __call__(self, waveform: torch.Tensor) -> str:
        self.calls.append(waveform)
        return self.words


@pytest.fixture
def transcriber() -> FakeTranscriber:
    """A transcriber that hears "what shape is in the image"."""
    return FakeTranscriber()


@pytest.fixture
def session(tiny_model: Any, transcriber: FakeTranscriber) -> Any:
    """A chat session over the tiny classifier with the fake transcriber."""
    from mllm_missing.chat import ChatSession, ClassifierAnswerer

    return ChatSession(ClassifierAnswerer(tiny_model), transcriber=transcriber)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """A real PNG, a 1 s 16 kHz WAV, a text file, a truncated PNG and an empty file."""
    rng = np.random.default_rng(0)
    png = tmp_path / "shape.png"
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(png)
    wav = tmp_path / "speech.wav"
    tone = (0.3 * np.sin(np.linspace(0, 440 * 2 * np.pi, 16000)) * 32767).astype("<i2")
    with wave.open(str(wav), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(16000)
        writer.writeframes(tone.tobytes())
    text = tmp_path / "notes.txt"
    text.write_text("this is not an image nor audio\n")
    broken = tmp_path / "broken.png"
    broken.write_bytes(png.read_bytes()[:60])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    return {"png": png, "wav": wav, "txt": text, "broken": broken, "empty": empty}
