"""StaticDecoder: the same greedy tokens as transformers' generate, from fixed buffers."""

from __future__ import annotations

import pytest
import torch

from mllm_missing.backbones.testing import tiny_llama_config
from mllm_missing.errors import ConfigError
from mllm_missing.inference.decoding import StaticDecoder, _after_eos

VOCAB = 300


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(VOCAB)).eval()


def _prompts(batch: int = 3, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    if batch == 3:
        mask[1, :2] = 0  # left padding of different lengths
        mask[2, :4] = 0
    return ids, mask


def _generate(model, ids, mask, new):
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_matches_generate_with_left_padding(model, attention):
    model.config._attn_implementation = attention
    try:
        ids, mask = _prompts()
        reference = _generate(model, ids, mask, 12)
        decoder = StaticDecoder(model, max_length=23)
        first = decoder.generate(ids, attention_mask=mask, max_new_tokens=12)
        again = decoder.generate(ids, attention_mask=mask, max_new_tokens=12)  # buffers reused
    finally:
        model.config._attn_implementation = "sdpa"
    assert torch.equal(first.sequences, reference)
    assert torch.equal(again.sequences, reference)
    assert not first.cuda_graph  # CPU: the same step runs eagerly


def test_a_shorter_call_after_a_longer_one_is_not_polluted(model):
    ids, mask = _prompts()
    decoder = StaticDecoder(model, max_length=39)
    decoder.generate(ids, attention_mask=mask, max_new_tokens=30)
    short_ids = ids[:, 3:]
    short = decoder.generate(short_ids, attention_mask=mask[:, 3:].clamp(min=1), max_new_tokens=5)
    reference = _generate(model, short_ids, torch.ones_like(short_ids), 5)
    assert torch.equal(short.sequences, reference)


def test_inputs_embeds_give_the_tokens_of_their_ids(model):
    ids, mask = _prompts()
    decoder = StaticDecoder(model, max_length=23)
    from_ids = decoder.generate(ids, attention_mask=mask, max_new_tokens=8)
    embeds = model.get_input_embeddings()(ids)
    from_embeds = decoder.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=8)
    assert from_embeds.sequences.shape == (3, 8)  # new tokens only, as generate returns
    assert torch.equal(from_embeds.sequences, from_ids.new_tokens)


def test_learned_prompt_embeddings_decode_as_generate_does(model):
    ids, _ = _prompts(batch=2)
    embeds = model.get_input_embeddings()(ids)
    prompt = torch.randn(2, 4, embeds.shape[-1], generator=torch.Generator().manual_seed(3))
    joined = torch.cat([prompt, embeds], 1)
    reference = model.generate(
        inputs_embeds=joined, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    ours = StaticDecoder(model, max_length=23).generate(inputs_embeds=joined, max_new_tokens=8)
    assert torch.equal(ours.sequences, reference)


def test_after_eos_pads_and_trims_like_generate():
    tokens = torch.tensor([[5, 2, 7, 8, 9], [5, 6, 2, 8, 9]])
    out = _after_eos(tokens, 2, 0)
    assert out.tolist() == [[5, 2, 0], [5, 6, 2]]
    assert torch.equal(_after_eos(tokens, None, 0), tokens)
    assert _after_eos(torch.tensor([[5, 6]]), [2, 3], None).tolist() == [[5, 6]]


def test_eos_handling_matches_generate(model):
    ids, mask = _prompts()
    free = _generate(model, ids, mask, 10)[:, ids.shape[1] :]
    eos = int(free[0, 3])  # a token the first row produces: it ends there
    reference = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=10,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
    )
    ours = StaticDecoder(model, max_length=23).generate(
        ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0
    )
    assert torch.equal(ours.sequences, reference)


def test_bad_calls_are_refused(model):
    ids, mask = _prompts()
    decoder = StaticDecoder(model, max_length=10)
    with pytest.raises(ConfigError, match="exactly one"):
        decoder.generate(max_new_tokens=2)
    with pytest.raises(ConfigError, match="max_length 10"):
        decoder.generate(ids, max_new_tokens=5)
    with pytest.raises(ConfigError, match="right padding"):
        decoder.generate(ids, attention_mask=mask.flip(1), max_new_tokens=2)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        decoder.generate(ids, max_new_tokens=0)
    with pytest.raises(ConfigError, match="max_length"):
        StaticDecoder(model, max_length=1)
    with pytest.raises(ConfigError, match="one CUDA device"):
        StaticDecoder(model, max_length=10, cuda_graph=True)


@pytest.mark.gpu
def test_cuda_graph_decoding_matches_eager_steps(model):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gpu = model.to("cuda")
    try:
        ids, mask = (t.cuda() for t in _prompts())
        graphed = StaticDecoder(gpu, max_length=23).generate(
            ids, attention_mask=mask, max_new_tokens=12
        )
        eager = StaticDecoder(gpu, max_length=23, cuda_graph=False).generate(
            ids, attention_mask=mask, max_new_tokens=12
        )
        reference = _generate(gpu, ids, mask, 12)
    finally:
        model.to("cpu")
    assert graphed.cuda_graph
    assert torch.equal(graphed.sequences, eager.sequences)
    assert torch.equal(graphed.sequences, reference)


def test_int8_layers_keep_the_decoder_eager(model):
    pytest.importorskip("bitsandbytes")
    import copy

    from mllm_missing.inference.decoding import _uncapturable_layer
    from mllm_missing.inference.quantization import QuantizationConfig, quantize_model

    assert _uncapturable_layer(model) is None
    int8 = quantize_model(copy.deepcopy(model), QuantizationConfig(mode="int8"), device="cpu")
    assert "LLM.int8" in (_uncapturable_layer(int8) or "")
    assert not StaticDecoder(int8, max_length=10).cuda_graph
