"""Tests of audio loading/validation and the frozen Whisper audio encoder."""

from __future__ import annotations

import logging
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from mllm_missing.backbones import audio
from mllm_missing.backbones.audio import (
    WhisperAudioEncoder,
    check_audio,
    load_audio,
    load_whisper_audio_encoder,
)
from mllm_missing.errors import DataFormatError

SPEECH = Path("/usr/share/pocketsphinx/test/data/librivox")


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000, width: int = 2) -> Path:
    """Write integer PCM `samples` (frames,) or (frames, channels) with the `wave` module."""
    frames = samples.reshape(len(samples), -1) if samples.size else samples.reshape(0, 1)
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(frames.shape[1])
        writer.setsampwidth(width)
        writer.setframerate(rate)
        if width == 3:
            as_bytes = frames.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3]
            writer.writeframes(as_bytes.tobytes())
        else:
            dtype = {1: np.uint8, 2: "<i2", 4: "<i4"}[width]
            writer.writeframes(frames.astype(dtype).tobytes())
    return path


def sine(freq: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return amplitude * np.sin(2 * np.pi * freq * t)


@pytest.fixture(params=["soundfile", "wave"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run each loading test with soundfile and with the standard-library fallback."""
    if request.param == "soundfile":
        pytest.importorskip("soundfile", reason="soundfile is in the audio extra")
    else:
        monkeypatch.setattr(audio, "_soundfile", lambda: None)
    return str(request.param)


def test_int16_mono_is_scaled(tmp_path: Path, backend: str) -> None:
    data = np.array([0, 16384, -16384, 32767, -32768, 100], dtype=np.int16)
    waveform = load_audio(write_wav(tmp_path / "a.wav", data))
    assert waveform.dtype == torch.float32 and waveform.shape == (6,)
    assert torch.allclose(waveform, torch.from_numpy(data / 32768.0).float())


@pytest.mark.parametrize(("width", "scale"), [(1, 128), (3, 2**23), (4, 2**31)])
def test_other_pcm_widths_are_scaled(tmp_path: Path, backend: str, width: int, scale: int) -> None:
    values = np.array([0.0, 0.5, -0.25, -1.0])
    stored = np.round(values * scale).astype(np.int64)
    if width == 1:
        stored += 128  # 8-bit WAV is unsigned
    waveform = load_audio(write_wav(tmp_path / "w.wav", stored, width=width))
    assert np.allclose(waveform.numpy(), values, atol=1e-6)


def test_8khz_is_resampled(tmp_path: Path, backend: str) -> None:
    path = write_wav(tmp_path / "8k.wav", np.round(sine(440, 8000, 0.5) * 32767), rate=8000)
    waveform = load_audio(path)
    assert waveform.shape == (8000,)  # 0.5 s at 16 kHz
    # A real resampler reproduces the tone at the new rate (not zero-stuffing, not repeats).
    expected = sine(440, 16000, 0.5)
    assert np.abs(waveform.numpy() - expected)[400:-400].max() < 0.01
    assert load_audio(path, target_sr=8000).shape == (4000,)
    odd = write_wav(tmp_path / "44k.wav", np.round(sine(440, 44100, 0.3) * 32767), rate=44100)
    assert load_audio(odd).shape == (int(np.ceil(0.3 * 44100 * 160 / 441)),)


def test_wrong_rate_without_resampling_is_an_error(tmp_path: Path, backend: str) -> None:
    path = write_wav(tmp_path / "8k.wav", np.zeros(800), rate=8000)
    with pytest.raises(
        DataFormatError, match=r"8k\.wav: sample rate is 8000 Hz; 16000 Hz is needed"
    ):
        load_audio(path, resample=False)
    assert load_audio(path, target_sr=8000, resample=False).shape == (800,)


def test_stereo_is_averaged(tmp_path: Path, backend: str) -> None:
    left = np.round(sine(300, 16000, 0.1) * 32767)
    right = np.full_like(left, 8192)
    waveform = load_audio(write_wav(tmp_path / "st.wav", np.stack([left, right], axis=1)))
    assert waveform.shape == left.shape
    assert np.allclose(waveform.numpy(), (left + right) / 2 / 32768, atol=1e-6)


def test_silence_is_accepted_and_flagged(
    tmp_path: Path, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=audio.__name__):
        waveform = load_audio(write_wav(tmp_path / "quiet.wav", np.zeros(1600)))
    assert waveform.shape == (1600,) and not waveform.any()
    assert "quiet.wav: the audio is silent" in caplog.text
    check = check_audio(waveform)
    assert check.is_silent and check.clipped_fraction == 0 and check.num_samples == 1600


def test_clipping_is_accepted_with_its_fraction(
    tmp_path: Path, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    data = np.round(sine(200, 16000, 1.0, amplitude=0.3) * 32767)
    data[::10] = 32767  # 10 % of samples at full scale, half of them negative
    data[::20] = -32768
    with caplog.at_level(logging.WARNING, logger=audio.__name__):
        waveform = load_audio(write_wav(tmp_path / "loud.wav", data))
    assert "loud.wav: 10.0% of samples are clipped" in caplog.text
    check = check_audio(waveform)
    assert check.is_clipped and not check.is_silent
    assert check.clipped_fraction == pytest.approx(0.1)


def test_ordinary_audio_loads_quietly(
    tmp_path: Path, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    data = np.round(sine(200, 16000, 1.0) * 32767)
    data[1000:1005] = 32767  # a few samples at full scale are normal in loud speech
    with caplog.at_level(logging.WARNING, logger=audio.__name__):
        waveform = load_audio(write_wav(tmp_path / "ok.wav", data))
    assert caplog.text == ""
    check = check_audio(waveform)
    assert 0 < check.clipped_fraction < audio.CLIP_WARN_FRACTION and not check.is_clipped


def test_empty_missing_and_garbage_files(tmp_path: Path, backend: str) -> None:
    with pytest.raises(DataFormatError, match=r"empty\.wav: the audio is empty \(0 samples\)"):
        load_audio(write_wav(tmp_path / "empty.wav", np.zeros(0)))
    with pytest.raises(DataFormatError, match=r"audio file not found: .*absent\.wav"):
        load_audio(tmp_path / "absent.wav")
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not a RIFF file at all" * 10)
    with pytest.raises(DataFormatError, match=r"garbage\.wav: not a readable"):
        load_audio(garbage)
    truncated = tmp_path / "cut.wav"
    truncated.write_bytes(write_wav(tmp_path / "full.wav", np.zeros(1000)).read_bytes()[:30])
    with pytest.raises(DataFormatError, match=r"cut\.wav"):
        load_audio(truncated)


# ---- the encoder wrapper: a tiny random Whisper encoder (fast), then the real tiny.en ----


@pytest.fixture(scope="module")
def tiny_encoder() -> WhisperAudioEncoder:
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=64,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        decoder_start_token_id=2,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    return WhisperAudioEncoder(model.get_encoder(), WhisperFeatureExtractor(), name="tiny")


def test_encoder_is_frozen(tiny_encoder: WhisperAudioEncoder) -> None:
    tiny_encoder.train()
    assert not tiny_encoder.encoder.training
    assert not any(p.requires_grad for p in tiny_encoder.parameters())
    assert (tiny_encoder.name, tiny_encoder.dim) == ("tiny", 16)


def test_encode_pools_only_real_frames(tiny_encoder: WhisperAudioEncoder) -> None:
    rng = np.random.default_rng(0)
    one_second = rng.uniform(-0.3, 0.3, 16000).astype(np.float32)
    half_second = torch.from_numpy(rng.uniform(-0.3, 0.3, 8000).astype(np.float32))
    frames, mask = tiny_encoder.encode_frames([one_second, half_second])
    assert frames.shape == (2, 1500, 16)
    assert mask.sum(dim=1).tolist() == [50, 25]  # 20 ms per frame
    pooled = tiny_encoder.encode([one_second, half_second])
    assert pooled.shape == (2, 16)
    assert torch.allclose(pooled[0], frames[0, :50].mean(dim=0), atol=1e-6)
    assert torch.allclose(pooled[1], frames[1, :25].mean(dim=0), atol=1e-6)
    assert not torch.allclose(pooled[0], frames[0].mean(dim=0), atol=1e-3)
    # Each clip is encoded on its own: batching does not change it.
    assert torch.allclose(tiny_encoder.encode([half_second])[0], pooled[1], atol=1e-5)
    assert tiny_encoder.num_valid_frames(1) == 1
    assert tiny_encoder.num_valid_frames(10**7) == 1500


def test_encode_refuses_unusable_input(
    tiny_encoder: WhisperAudioEncoder, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ValueError, match="waveform 1 is empty"):
        tiny_encoder.encode([np.ones(100, np.float32), np.zeros(0, np.float32)])
    with pytest.raises(ValueError, match="must be mono"):
        tiny_encoder.encode([np.zeros((2, 100), np.float32)])
    with caplog.at_level(logging.WARNING, logger=audio.__name__):
        _, mask = tiny_encoder.encode_frames([np.full(16000 * 31, 0.1, np.float32)])
    assert "longer than 30 s" in caplog.text and bool(mask.all())


@pytest.mark.slow
@pytest.mark.skipif(
    not SPEECH.is_dir(),
    reason="Debian pocketsphinx-testdata is not installed (scripts/install.sh dev installs it)",
)
def test_real_encoder_on_speech(tmp_path: Path) -> None:
    encoder = load_whisper_audio_encoder()
    assert encoder.dim == 384 and encoder.name == "whisper-tiny.en"
    clip = SPEECH / "sense_and_sensibility_01_austen_64kb-0880.wav"
    other = SPEECH / "sense_and_sensibility_01_austen_64kb-0890.wav"
    speech = load_audio(clip)
    # The same sentence through an 8 kHz round trip, to be recognised as the same speech.
    low = audio.resample_audio(speech.numpy(), 16000, 8000)
    narrow = write_wav(tmp_path / "8k.wav", np.round(low * 32767), rate=8000)
    embeddings = encoder.encode([speech, load_audio(narrow), load_audio(other)])
    unit = torch.nn.functional.normalize(embeddings, dim=1)
    same, different = float(unit[0] @ unit[1]), float(unit[0] @ unit[2])
    assert same > 0.99 and different < same - 0.1, (same, different)
    assert torch.allclose(encoder.encode_files([clip])[0], embeddings[0], atol=1e-4)
