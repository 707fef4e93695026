"""Reading a chat turn's attachments: images and audio from paths or bytes, checked and limited.

Every refusal is a `ChatInputError` whose message names the input and the problem, so a chat can
print it and go on. Limits (`ChatLimits`): a file or upload is at most ``max_file_bytes``
(default 10 MB), an image at most ``max_image_pixels`` (default 40 megapixels, checked from the
header before decoding), audio at most ``max_audio_seconds`` (default 30 s, Whisper's window) and
a typed question at most ``max_text_chars`` (default 2,000).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mllm_missing.errors import ConfigError, MllmMissingError

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "ChatInputError",
    "ChatLimits",
    "Transcriber",
    "WhisperTranscriber",
    "read_audio",
    "read_image",
]

logger = logging.getLogger(__name__)

#: A transcriber turns a mono 16 kHz waveform into text.
Transcriber = Callable[[torch.Tensor], str]

_MB = 1024 * 1024


class ChatInputError(MllmMissingError):
    """A chat turn's input cannot be used; the message says which input and why."""


@dataclass(frozen=True)
class ChatLimits:
    """Size limits on one chat turn's inputs.

    Attributes:
        max_file_bytes: largest image or audio file / upload.
        max_image_pixels: largest image (width x height), checked before decoding.
        max_audio_seconds: longest audio (Whisper transcribes at most 30 s).
        max_text_chars: longest typed question.
    """

    max_file_bytes: int = 10 * _MB
    max_image_pixels: int = 40_000_000
    max_audio_seconds: float = 30.0
    max_text_chars: int = 2000

    def __post_init__(self) -> None:
        for name in ("max_file_bytes", "max_image_pixels", "max_audio_seconds", "max_text_chars"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"ChatLimits.{name} must be > 0; got {getattr(self, name)!r}")


def _size(n: int) -> str:
    return f"{n / _MB:.1f} MB" if n >= _MB / 10 else f"{n:,} bytes"


def _read_bytes(
    kind: str, source: str | Path | bytes | bytearray, limits: ChatLimits
) -> tuple[bytes, str]:
    """The file's bytes and a name for messages, after the existence and size checks."""
    if isinstance(source, (bytes, bytearray)):
        data, name = bytes(source), f"the uploaded {kind}"
    else:
        path = Path(source).expanduser()
        name = f"{kind} {path}"
        if not path.exists():
            raise ChatInputError(f"{kind} file not found: {path}")
        if not path.is_file():
            raise ChatInputError(f"{name}: not a file")
        size = path.stat().st_size
        if size > limits.max_file_bytes:
            raise ChatInputError(
                f"{name} is too large ({_size(size)}; the limit is {_size(limits.max_file_bytes)})"
            )
        data = path.read_bytes()
    if len(data) > limits.max_file_bytes:
        raise ChatInputError(
            f"{name} is too large ({_size(len(data))}; the limit is {_size(limits.max_file_bytes)})"
        )
    if not data:
        raise ChatInputError(f"{name} is empty (0 bytes)")
    return data, name


def read_image(source: Any, limits: ChatLimits | None = None) -> PILImage.Image:
    """An RGB image from a path, bytes or a PIL image.

    Raises:
        ChatInputError: the file is missing, empty, too large, or not a readable image.
    """
    from PIL import Image, UnidentifiedImageError

    limits = limits or ChatLimits()
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if not isinstance(source, (str, Path, bytes, bytearray)):
        raise ChatInputError(f"image must be a path, bytes or a PIL image; got {type(source)}")
    data, name = _read_bytes("image", source, limits)
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > limits.max_image_pixels:
                raise ChatInputError(
                    f"{name} is too large ({width}x{height} pixels; the limit is "
                    f"{limits.max_image_pixels:,} pixels)"
                )
            return image.convert("RGB")
    except ChatInputError:
        raise
    except UnidentifiedImageError:
        raise ChatInputError(f"{name}: not an image (no image format Pillow reads)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ChatInputError(f"{name}: cannot read it as an image ({exc})") from None


def read_audio(source: Any, limits: ChatLimits | None = None) -> torch.Tensor:
    """A mono 16 kHz float waveform from a path, bytes, or an array already at 16 kHz.

    Raises:
        ChatInputError: the file is missing, empty, too large or too long, or not audio.
    """
    import tempfile

    from mllm_missing.backbones.audio import WHISPER_SAMPLE_RATE

    limits = limits or ChatLimits()
    if isinstance(source, (torch.Tensor, np.ndarray)):
        waveform = torch.as_tensor(source, dtype=torch.float32).flatten()
        where = "the audio"
    elif isinstance(source, (str, Path)):
        _, where = _read_bytes("audio", source, limits)
        waveform = _load_audio(str(Path(source).expanduser()), where)
    elif isinstance(source, (bytes, bytearray)):
        data, where = _read_bytes("audio", source, limits)
        # load_audio reads files; bytes go through a private temporary file.
        with tempfile.NamedTemporaryFile(suffix=".audio") as handle:
            handle.write(data)
            handle.flush()
            waveform = _load_audio(handle.name, where)
    else:
        raise ChatInputError(f"audio must be a path, bytes or a waveform; got {type(source)}")
    if waveform.numel() == 0:
        raise ChatInputError(f"{where} holds no samples")
    seconds = waveform.numel() / WHISPER_SAMPLE_RATE
    if seconds > limits.max_audio_seconds:
        raise ChatInputError(
            f"{where} is too long ({seconds:.1f} s; the limit is {limits.max_audio_seconds:g} s)"
        )
    return waveform


def _load_audio(path: str, where: str) -> torch.Tensor:
    from mllm_missing.backbones.audio import load_audio

    try:
        return load_audio(path)
    except (MllmMissingError, OSError, ValueError, RuntimeError) as exc:
        reason = str(exc).removeprefix(f"{path}: ").replace(f"'{path}'", "it")
        raise ChatInputError(f"{where}: {reason}") from None


class WhisperTranscriber:
    """Whisper tiny.en (the packaged CTranslate2 model, converted offline), loaded on first use.

    Args:
        device: where the model runs.
        cache_dir: cache root for the converted model.
    """

    def __init__(self, device: str = "cpu", cache_dir: str | Path | None = None) -> None:
        self.device = device
        self.cache_dir = cache_dir
        self._model: Any = None
        self._processor: Any = None

    def __call__(self, waveform: torch.Tensor) -> str:
        """The transcript of a mono 16 kHz waveform (at most 30 s)."""
        from mllm_missing.backbones.audio import transcribe

        if self._model is None:
            from mllm_missing.backbones.whisper_ct2 import (
                load_ct2_whisper,
                load_ct2_whisper_processor,
            )

            logger.info("loading Whisper tiny.en for audio questions")
            model: Any = load_ct2_whisper(cache_dir=self.cache_dir)
            self._model = model.to(self.device)
            self._processor = load_ct2_whisper_processor(cache_dir=self.cache_dir)
        with torch.inference_mode():
            return transcribe(self._model, self._processor, [waveform])[0]
