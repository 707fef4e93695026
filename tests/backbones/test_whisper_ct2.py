"""Tests of the CTranslate2 -> transformers Whisper conversion (real tiny.en and real speech)."""

from __future__ import annotations

import re
import struct
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from mllm_missing.backbones import whisper_ct2
from mllm_missing.backbones.audio import transcribe
from mllm_missing.backbones.whisper_ct2 import (
    CT2Checkpoint,
    build_whisper_processor,
    convert_ct2_whisper,
    ct2_whisper_cache_path,
    default_ct2_whisper_dir,
    load_ct2_whisper,
    load_ct2_whisper_processor,
    read_ct2_checkpoint,
)
from mllm_missing.errors import DataFormatError
from mllm_missing.metrics import normalise_transcript, word_errors

SPEECH = Path("/usr/share/pocketsphinx/test/data/librivox")
needs_speech = pytest.mark.skipif(
    not (SPEECH / "transcription").is_file(),
    reason="Debian pocketsphinx-testdata is not installed (scripts/install.sh dev installs it)",
)
_DTYPE_IDS = {
    torch.float32: 0,
    torch.int8: 1,
    torch.int16: 2,
    torch.int32: 3,
    torch.float16: 4,
    torch.bfloat16: 5,
}


def write_ct2(path: Path, ckpt: CT2Checkpoint, version: int = 6) -> Path:
    """Write `ckpt` in CTranslate2's model.bin layout (mirrors ctranslate2/specs/model_spec.py)."""

    def string(value: str) -> bytes:
        raw = value.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    out = [struct.pack("<I", version), string(ckpt.spec), struct.pack("<I", ckpt.revision)]
    out.append(struct.pack("<I", len(ckpt.variables)))
    for name, value in ckpt.variables.items():
        data = value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        out += [string(name), struct.pack("<B", value.dim())]
        out += [struct.pack("<I", d) for d in value.shape]
        out += [struct.pack("<BI", _DTYPE_IDS[value.dtype], len(data)), data]
    out.append(struct.pack("<I", len(ckpt.aliases)))
    for alias, target in ckpt.aliases.items():
        out += [string(alias), string(target)]
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.bin").write_bytes(b"".join(out))
    return path


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as reader:
        raw = reader.readframes(reader.getnframes())
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768


def references() -> dict[str, list[str]]:
    refs = {}
    for line in (SPEECH / "transcription").read_text().splitlines():
        match = re.match(r"<s>(.*)</s>\s*\((.*)\)", line.strip())
        assert match, line
        refs[match.group(2)] = match.group(1).split()
    return refs


# ---- conversion of CTranslate2's own output for a tiny random Whisper, every storage type ----


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A tiny random Whisper saved with the real tokenizer (CTranslate2's converter reads both)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=51864,
        d_model=16,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        decoder_start_token_id=50257,
        bos_token_id=50256,
        eos_token_id=50256,
        pad_token_id=50256,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # distinct non-zero values everywhere, so a swapped tensor shows
        for parameter in model.parameters():
            parameter.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("tiny_hf")
    model.save_pretrained(folder)
    build_whisper_processor(default_ct2_whisper_dir()).save_pretrained(folder)
    return model, folder


def ct2_convert(hf_folder: Path, out: Path, quantization: str) -> Path:
    from ctranslate2.converters import TransformersConverter

    TransformersConverter(str(hf_folder)).convert(str(out), quantization=quantization)
    return out


# Worst relative error (to each tensor's max) of CTranslate2's storage: int8 rounds per row to
# 1/254 of the row max; int16 to 1/2048 of the fused tensor's max (a bit more for one part).
@pytest.mark.parametrize(
    ("quantization", "tolerance"),
    [
        ("float32", 0.0),
        ("float16", 2**-11),
        ("bfloat16", 2**-8),
        ("int8", 1 / 254),
        ("int16", 1e-3),
    ],
)
def test_roundtrip_through_ctranslate2(tiny_hf, tmp_path, quantization, tolerance) -> None:  # type: ignore[no-untyped-def]
    model, folder = tiny_hf
    converted = convert_ct2_whisper(ct2_convert(folder, tmp_path / "ct2", quantization))
    original, result = model.state_dict(), converted.state_dict()
    assert set(original) == set(result)
    for key, value in original.items():
        error = float((result[key] - value).abs().max() / value.abs().max().clamp_min(1e-12))
        assert error <= tolerance * 1.001 + 1e-7, (key, error)
    assert converted.config.tie_word_embeddings
    assert (
        converted.proj_out.weight.data_ptr()
        == converted.model.decoder.embed_tokens.weight.data_ptr()
    )
    if quantization == "float32":
        features = torch.randn(1, 80, 3000)
        tokens = torch.tensor([[50257, 50362, 400, 500]])
        with torch.no_grad():
            a = model(input_features=features, decoder_input_ids=tokens).logits
            b = converted(input_features=features, decoder_input_ids=tokens).logits
        assert torch.equal(a, b)
        generation = converted.generation_config
        assert generation.no_timestamps_token_id == 50362
        assert generation.decoder_start_token_id == 50257 and not generation.is_multilingual


@pytest.fixture
def tiny_ct2(tiny_hf, tmp_path):  # type: ignore[no-untyped-def]
    return ct2_convert(tiny_hf[1], tmp_path / "ct2", "float32")


def _rewrite(folder: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    ckpt = read_ct2_checkpoint(folder)
    edit(ckpt)
    return write_ct2(folder, ckpt)


def test_writer_matches_reader(tiny_ct2: Path) -> None:
    original = (tiny_ct2 / "model.bin").read_bytes()
    assert (_rewrite(tiny_ct2, lambda c: None) / "model.bin").read_bytes() == original


def test_wrong_shape_names_the_variable(tiny_ct2: Path) -> None:
    name = "encoder/layer_1/ffn/linear_1/weight"
    _rewrite(tiny_ct2, lambda c: c.variables.__setitem__(name, c.variables[name].t().clone()))
    with pytest.raises(DataFormatError, match=re.escape(f"'{name}' has shape [32, 16]")):
        convert_ct2_whisper(tiny_ct2)


def test_unknown_variable_is_an_error(tiny_ct2: Path) -> None:
    name = "decoder/layernorm_embedding/gamma"
    _rewrite(tiny_ct2, lambda c: c.variables.__setitem__(name, torch.ones(16)))
    with pytest.raises(DataFormatError, match=re.escape(name)):
        convert_ct2_whisper(tiny_ct2)


def test_missing_variable_is_named(tiny_ct2: Path) -> None:
    _rewrite(tiny_ct2, lambda c: c.variables.pop("encoder/conv2/weight"))
    with pytest.raises(DataFormatError, match="'encoder/conv2/weight' is missing"):
        convert_ct2_whisper(tiny_ct2)


def test_architecture_flags_are_checked(tiny_ct2: Path) -> None:
    _rewrite(
        tiny_ct2,
        lambda c: c.variables.__setitem__("decoder/pre_norm", torch.tensor(0, dtype=torch.int8)),
    )
    with pytest.raises(DataFormatError, match="'decoder/pre_norm' is 0"):
        convert_ct2_whisper(tiny_ct2)


def test_bad_files(tiny_ct2: Path, tmp_path: Path) -> None:
    data = (tiny_ct2 / "model.bin").read_bytes()
    (tiny_ct2 / "model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFormatError, match=r"model\.bin: truncated"):
        read_ct2_checkpoint(tiny_ct2)
    (tiny_ct2 / "model.bin").write_bytes(struct.pack("<I", 99) + data[4:])
    with pytest.raises(DataFormatError, match="binary version 99 is not supported"):
        read_ct2_checkpoint(tiny_ct2)
    with pytest.raises(DataFormatError, match="CTranslate2 model file not found"):
        read_ct2_checkpoint(tmp_path / "nowhere")


def test_import_is_light() -> None:
    code = (
        "import sys, mllm_missing, mllm_missing.backbones.audio, mllm_missing.backbones.whisper_ct2;"
        "heavy = {'transformers', 'ctranslate2', 'scipy', 'soundfile'} & set(sys.modules);"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- the real packaged tiny.en against CTranslate2 itself, on real speech ----


@pytest.mark.slow
def test_reader_reads_every_byte_of_the_packaged_model(tmp_path: Path) -> None:
    source = default_ct2_whisper_dir() / "model.bin"
    ckpt = read_ct2_checkpoint(source)
    assert (ckpt.spec, ckpt.binary_version) == ("WhisperSpec", 6)
    assert ckpt.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert (write_ct2(tmp_path, ckpt) / "model.bin").read_bytes() == source.read_bytes()


@pytest.fixture(scope="module")
def whisper(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    cache = tmp_path_factory.mktemp("whisper_cache")
    model = load_ct2_whisper(cache_dir=cache)
    return model, load_ct2_whisper_processor(cache_dir=cache), cache


@pytest.fixture(scope="module")
def ct2_model():  # type: ignore[no-untyped-def]
    import ctranslate2

    return ctranslate2.models.Whisper(
        str(default_ct2_whisper_dir()), device="cpu", compute_type="float32"
    )


@pytest.mark.slow
@needs_speech
def test_encoder_matches_ctranslate2(whisper, ct2_model) -> None:  # type: ignore[no-untyped-def]
    import ctranslate2

    model, processor, _ = whisper
    audio = read_wav(SPEECH / "sense_and_sensibility_01_austen_64kb-0870.wav")
    features = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="np")
    features = np.ascontiguousarray(features.input_features)
    ours = model.get_encoder()(torch.from_numpy(features)).last_hidden_state.detach().numpy()
    theirs = np.asarray(ct2_model.encode(ctranslate2.StorageView.from_array(features), to_cpu=True))
    assert ours.shape == theirs.shape == (1, 1500, 384)
    # Relative errors: Frobenius norm of the difference over that of the reference, and the
    # largest absolute difference over the largest absolute reference value.
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < 1e-4
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() < 1e-4


@pytest.mark.slow
@needs_speech
def test_transcription_matches_reference_and_ctranslate2(whisper, ct2_model) -> None:  # type: ignore[no-untyped-def]
    import ctranslate2

    model, processor, _ = whisper
    refs = references()
    names = sorted(refs)
    audio = [read_wav(SPEECH / f"{name}.wav") for name in names]
    texts = transcribe(model, processor, audio)
    errors = sum(word_errors(refs[n], normalise_transcript(t)) for n, t in zip(names, texts))
    assert errors / sum(len(refs[n]) for n in names) <= 0.10, texts
    joined = " ".join(texts).lower()
    for word in ("dashwood", "prudently", "selfish", "amiable", "respectable"):
        assert word in joined
    features = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="np")
    results = ct2_model.generate(
        ctranslate2.StorageView.from_array(np.ascontiguousarray(features.input_features)),
        [[50257, 50362]] * len(names),
        beam_size=1,
    )
    theirs = [
        processor.tokenizer.decode(r.sequences_ids[0], skip_special_tokens=True).strip()
        for r in results
    ]
    assert texts == theirs


@pytest.mark.slow
def test_cached_copy_reloads_identically(whisper, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    _, _, cache = whisper
    target = ct2_whisper_cache_path(default_ct2_whisper_dir(), cache)
    assert target.is_dir() and target.parent == cache / "models" / "whisper_ct2"
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".tmp-")]
    fresh = convert_ct2_whisper(default_ct2_whisper_dir())

    def refuse(model_dir):  # type: ignore[no-untyped-def]
        raise AssertionError("the cached copy should have been used")

    monkeypatch.setattr(whisper_ct2, "convert_ct2_whisper", refuse)
    cached = load_ct2_whisper(cache_dir=cache)
    a_state, b_state = fresh.state_dict(), cached.state_dict()
    assert set(a_state) == set(b_state)
    assert all(torch.equal(a_state[k], b_state[k]) for k in a_state)
    features = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor([[50257, 50362, 1400]])
    with torch.no_grad():
        a = fresh(input_features=features, decoder_input_ids=tokens).logits
        b = cached(input_features=features, decoder_input_ids=tokens).logits
    assert torch.equal(a, b)
    for field in (
        "no_timestamps_token_id",
        "suppress_tokens",
        "begin_suppress_tokens",
        "max_length",
    ):
        assert getattr(cached.generation_config, field) == getattr(fresh.generation_config, field)
    assert len(cached.generation_config.suppress_tokens) == 90
