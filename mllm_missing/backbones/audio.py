"""Audio input: checked loading of speech files and a frozen Whisper encoder for audio features.

`load_audio` returns mono float32 in [-1, 1] at the rate asked for, and refuses what cannot be
used (a missing, unreadable or empty file; a wrong rate when resampling is off) with a
`DataFormatError` naming the file. Audio that loads but is suspect (silent, clipped) is accepted
with a logged warning; `check_audio` returns the same findings as an `AudioCheck` for callers that
want to act on them (e.g. mark the audio modality missing when it is silent).

Files are read with ``soundfile`` when it is installed (WAV of any encoding, FLAC, OGG, ...; the
``audio`` extra), else with the standard library's `wave` (integer PCM WAV only).
"""

from __future__ import annotations

import logging
import math
import wave
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from mllm_missing.backbones.base import freeze
from mllm_missing.errors import DataFormatError, require
from mllm_missing.types import Modality

if TYPE_CHECKING:
    from transformers import (
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )

__all__ = [
    "CLIP_LEVEL",
    "SILENCE_PEAK",
    "WHISPER_ENCODER_NAME",
    "WHISPER_SAMPLE_RATE",
    "AudioCheck",
    "WhisperAudioEncoder",
    "check_audio",
    "load_audio",
    "load_whisper_audio_encoder",
    "resample_audio",
    "transcribe",
]

logger = logging.getLogger(__name__)

WHISPER_ENCODER_NAME = "whisper-tiny.en"
WHISPER_SAMPLE_RATE = 16000
SILENCE_PEAK = 1e-4
"""Peak amplitude at or below which audio counts as silent (-80 dBFS; all zeros included)."""
CLIP_LEVEL = 0.999
"""Samples whose magnitude reaches this are counted as clipped."""
CLIP_WARN_FRACTION = 0.001
"""Share of clipped samples from which `load_audio` warns (a few peaks at full scale are normal)."""
# Whisper's encoder sees at most 30 s; each output frame covers 2 mel hops of 160 samples.
_SAMPLES_PER_FRAME = 320


@dataclass(frozen=True)
class AudioCheck:
    """What `check_audio` found in a waveform.

    Attributes:
        num_samples: length in samples.
        peak: largest absolute sample value.
        is_silent: peak at or below `SILENCE_PEAK`.
        clipped_fraction: share of samples with magnitude at or above `CLIP_LEVEL`.
    """

    num_samples: int
    peak: float
    is_silent: bool
    clipped_fraction: float

    @property
    def is_clipped(self) -> bool:
        """Whether enough samples are clipped to be worth a warning."""
        return self.clipped_fraction >= CLIP_WARN_FRACTION


def check_audio(waveform: torch.Tensor | np.ndarray) -> AudioCheck:
    """Silence and clipping statistics of a mono waveform in [-1, 1]."""
    values = np.abs(np.asarray(waveform, dtype=np.float32)).ravel()
    if values.size == 0:
        return AudioCheck(num_samples=0, peak=0.0, is_silent=True, clipped_fraction=0.0)
    peak = float(values.max())
    return AudioCheck(
        num_samples=int(values.size),
        peak=peak,
        is_silent=peak <= SILENCE_PEAK,
        clipped_fraction=float(np.count_nonzero(values >= CLIP_LEVEL)) / values.size,
    )


def _soundfile() -> Any:
    try:
        import soundfile
    except (ImportError, OSError):  # OSError: the package is there but libsndfile is not
        return None
    return soundfile


def _read_with_wave(path: Path) -> tuple[np.ndarray, int]:
    """(frames, channels) float32 and the rate, from an integer PCM WAV."""
    try:
        with wave.open(str(path), "rb") as reader:
            rate, channels = reader.getframerate(), reader.getnchannels()
            width = reader.getsampwidth()
            raw = reader.readframes(reader.getnframes())
    except (wave.Error, EOFError) as exc:
        raise DataFormatError(f"{path}: not a readable PCM WAV file ({exc})") from exc
    if width == 1:  # 8-bit WAV is unsigned, centred on 128
        data = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        data = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 3:
        padded = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3)
        # Place the 3 bytes in the top of an int32 so the sign comes out right.
        words = np.zeros((padded.shape[0], 4), dtype=np.uint8)
        words[:, 1:] = padded
        data = words.view("<i4").ravel().astype(np.float32) / 2.0**31
    elif width == 4:
        data = np.frombuffer(raw, dtype="<i4").astype(np.float32) / 2.0**31
    else:
        raise DataFormatError(f"{path}: unsupported WAV sample width of {width} bytes")
    usable = data.size - data.size % channels
    return data[:usable].reshape(-1, channels), rate


def _read(path: Path) -> tuple[np.ndarray, int]:
    soundfile = _soundfile()
    if soundfile is None:
        return _read_with_wave(path)
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as exc:
        raise DataFormatError(f"{path}: not a readable audio file ({exc})") from exc
    return np.asarray(data, dtype=np.float32), int(rate)


def resample_audio(waveform: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """Resample a 1-D waveform with a polyphase filter (`scipy.signal.resample_poly`)."""
    if rate == target_rate:
        return waveform
    require("scipy", "audio")
    from scipy.signal import resample_poly

    common = math.gcd(rate, target_rate)
    return np.asarray(
        resample_poly(waveform, target_rate // common, rate // common), dtype=np.float32
    )


def load_audio(
    path: str | Path, target_sr: int = WHISPER_SAMPLE_RATE, *, resample: bool = True
) -> torch.Tensor:
    """Load a speech file as a mono float32 waveform in [-1, 1] at `target_sr`.

    Stereo and multi-channel audio is averaged to mono; integer PCM is scaled by its full range
    (int16 by 32768). Silent audio (peak at or below `SILENCE_PEAK`) and clipped audio (at least
    `CLIP_WARN_FRACTION` of samples at `CLIP_LEVEL`) load with a logged warning; call
    `check_audio` on the result for the numbers.

    Args:
        path: an audio file (WAV; other formats when ``soundfile`` is installed).
        target_sr: sample rate wanted (Whisper needs 16000).
        resample: resample other rates to `target_sr`; when False, another rate is an error.

    Raises:
        DataFormatError: the file is missing, unreadable, holds no samples, or has another rate
            while `resample` is False; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"audio file not found: {path}")
    if target_sr <= 0:
        raise DataFormatError(f"{path}: target_sr must be positive; got {target_sr}")
    frames, rate = _read(path)
    if frames.shape[0] == 0:
        raise DataFormatError(f"{path}: the audio is empty (0 samples); mark it missing instead")
    waveform = frames.mean(axis=1) if frames.shape[1] > 1 else frames[:, 0]
    if rate != target_sr:
        if not resample:
            raise DataFormatError(
                f"{path}: sample rate is {rate} Hz; {target_sr} Hz is needed "
                f"(pass resample=True to convert it)"
            )
        waveform = resample_audio(waveform, rate, target_sr)
    waveform = np.clip(waveform, -1.0, 1.0)
    check = check_audio(waveform)
    if check.is_silent:
        logger.warning("%s: the audio is silent (peak %.2g)", path, check.peak)
    elif check.is_clipped:
        logger.warning("%s: %.1f%% of samples are clipped", path, 100 * check.clipped_fraction)
    return torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32))


class WhisperAudioEncoder(nn.Module):
    """A frozen Whisper encoder: 16 kHz waveforms -> frame features or pooled clip embeddings.

    Whisper pads every input to 30 s; `encode` averages only the frames that cover real audio
    (20 ms each), so a short clip is not diluted by the padding. Longer inputs are cut to 30 s
    (with a warning).

    Args:
        encoder: the Whisper encoder module (``model.get_encoder()``).
        feature_extractor: the matching `WhisperFeatureExtractor`.
        name: identifier used in feature-cache keys.
    """

    modality = Modality.AUDIO

    def __init__(
        self,
        encoder: nn.Module,
        feature_extractor: WhisperFeatureExtractor,
        name: str = WHISPER_ENCODER_NAME,
    ):
        super().__init__()
        self.encoder: Any = freeze(encoder)
        self.feature_extractor = feature_extractor
        self.name = name
        config: Any = self.encoder.config
        self.dim = int(config.d_model)
        self.max_frames = int(config.max_source_positions)
        self.sampling_rate = int(feature_extractor.sampling_rate)

    def train(self, mode: bool = True) -> WhisperAudioEncoder:
        """Keep the frozen encoder in eval mode whatever the caller asks."""
        super().train(mode)
        self.encoder.eval()
        return self

    def num_valid_frames(self, num_samples: int) -> int:
        """Encoder frames that cover `num_samples` of real audio (at least 1, at most 1500)."""
        return max(1, min(self.max_frames, math.ceil(num_samples / _SAMPLES_PER_FRAME)))

    def _arrays(self, waveforms: Sequence[torch.Tensor | np.ndarray]) -> list[np.ndarray]:
        if len(waveforms) == 0:
            raise ValueError("no waveforms given")
        arrays = []
        limit = self.max_frames * _SAMPLES_PER_FRAME
        for i, waveform in enumerate(waveforms):
            array = np.asarray(
                waveform.detach().cpu() if isinstance(waveform, torch.Tensor) else waveform,
                dtype=np.float32,
            )
            if array.ndim != 1:
                raise ValueError(f"waveform {i} must be mono (1-D); got shape {array.shape}")
            if array.size == 0:
                raise ValueError(f"waveform {i} is empty; mark the audio modality missing instead")
            if array.size > limit:
                logger.warning("waveform %d is longer than 30 s; only the first 30 s are used", i)
                array = array[:limit]
            arrays.append(array)
        return arrays

    @torch.inference_mode()
    def encode_frames(
        self, waveforms: Sequence[torch.Tensor | np.ndarray]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame features (batch, 1500, dim) and a (batch, 1500) mask of frames with real audio.

        Args:
            waveforms: mono float waveforms at 16 kHz (e.g. from `load_audio`).
        """
        arrays = self._arrays(waveforms)
        features = self.feature_extractor(
            arrays, sampling_rate=self.sampling_rate, return_tensors="pt"
        ).input_features
        device = next(self.encoder.parameters()).device
        frames: torch.Tensor = self.encoder(features.to(device)).last_hidden_state.float().cpu()
        valid = torch.tensor([self.num_valid_frames(a.size) for a in arrays])
        mask = torch.arange(frames.shape[1])[None, :] < valid[:, None]
        return frames, mask

    @torch.inference_mode()
    def encode(self, waveforms: Sequence[torch.Tensor | np.ndarray]) -> torch.Tensor:
        """Clip embeddings (batch, dim): the mean of each clip's frames that cover real audio.

        Args:
            waveforms: mono float waveforms at 16 kHz (e.g. from `load_audio`).
        """
        frames, mask = self.encode_frames(waveforms)
        weights = mask.to(frames.dtype).unsqueeze(-1)
        return (frames * weights).sum(dim=1) / weights.sum(dim=1)

    def encode_files(self, paths: Sequence[str | Path]) -> torch.Tensor:
        """Clip embeddings (batch, dim) for audio files, loaded with `load_audio`."""
        return self.encode([load_audio(path, self.sampling_rate) for path in paths])


def load_whisper_audio_encoder(
    model: WhisperForConditionalGeneration | None = None,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    name: str = WHISPER_ENCODER_NAME,
) -> WhisperAudioEncoder:
    """The frozen encoder of the packaged Whisper tiny.en (converted from CTranslate2, offline).

    Args:
        model: a Whisper model to take the encoder from; default: `load_ct2_whisper()`.
        cache_dir: cache root for the converted model (see `load_ct2_whisper`).
        device: where to put the encoder.
        name: identifier used in feature-cache keys (change it when passing another model).
    """
    from transformers import WhisperFeatureExtractor

    from mllm_missing.backbones.whisper_ct2 import load_ct2_whisper

    if model is None:
        model = load_ct2_whisper(cache_dir=cache_dir)
    features = WhisperFeatureExtractor(feature_size=model.config.num_mel_bins)
    return WhisperAudioEncoder(model.get_encoder(), features, name=name).to(device)


@torch.inference_mode()
def transcribe(
    model: WhisperForConditionalGeneration,
    processor: WhisperProcessor,
    waveforms: Sequence[torch.Tensor | np.ndarray],
    sampling_rate: int = WHISPER_SAMPLE_RATE,
    max_new_tokens: int | None = None,
) -> list[str]:
    """Greedy transcriptions of mono `waveforms` (each at most 30 s).

    Args:
        model: a Whisper model (e.g. from `load_ct2_whisper`).
        processor: its processor.
        waveforms: mono float waveforms in [-1, 1] (e.g. from `load_audio`).
        sampling_rate: their sample rate; the feature extractor refuses any but 16 kHz.
        max_new_tokens: cap on generated tokens per input; default: the model's maximum.
    """
    arrays = [np.asarray(w, dtype=np.float32) for w in waveforms]
    inputs = processor.feature_extractor(arrays, sampling_rate=sampling_rate, return_tensors="pt")
    device = next(model.parameters()).device
    options: dict[str, Any] = {"num_beams": 1, "do_sample": False}
    if max_new_tokens is not None:
        options["max_new_tokens"] = max_new_tokens
    tokens = model.generate(inputs.input_features.to(device), **options)
    texts: list[str] = processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)
    return [text.strip() for text in texts]
