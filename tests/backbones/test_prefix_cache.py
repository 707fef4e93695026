"""Tests of the frozen-prefix cache: the LRU map itself, and the sentence-encoder tower using it."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mllm_missing.backbones.base import LayerPrompts, PromptMode
from mllm_missing.backbones.hf_towers import SentenceEncoderBackbone
from mllm_missing.backbones.prefix_cache import PrefixCache
from tests.backbones.test_hf_towers import TEXT, TEXTS, make_bert

CPU = torch.device("cpu")


def make_deep_bert(**kwargs: Any) -> SentenceEncoderBackbone:
    """A 4-block BERT tower, so a prompt at block 2 leaves two blocks to the cache."""
    return make_bert(layers=4, **kwargs)


def prompts(mode: PromptMode, layers: list[int], batch: int, **kw: Any) -> LayerPrompts:
    generator = torch.Generator().manual_seed(5)
    shape = (batch, 3, 64) if mode is PromptMode.INPUT else (batch, 2, 3, 64)
    tokens = {
        layer: torch.randn(shape, generator=generator).requires_grad_(True) for layer in layers
    }
    return LayerPrompts(tokens, mode, **kw)


def block_calls(tower: Any) -> list[int]:
    """Per block, how many rows it has run on since the call (forward hooks)."""
    counts = [0] * len(tower.model.encoder.layer)
    for i, layer in enumerate(tower.model.encoder.layer):

        def count(module: Any, args: Any, output: Any, i: int = i) -> None:
            counts[i] += output.shape[0]

        layer.register_forward_hook(count)
    return counts


# --- the map ------------------------------------------------------------------------------------


def test_lru_evicts_the_least_recently_used_within_the_byte_bound() -> None:
    cache = PrefixCache(max_bytes=3 * 4 * 4)  # three float32 (1, 4) states
    for key in "abc":
        cache.lookup([key], CPU, torch.float32)
        cache.store(key, torch.full((1, 4), float(ord(key))))
    assert cache.lookup(["a"], CPU, torch.float32)[0] is not None  # "a" is now the most recent
    cache.store("d", torch.zeros(1, 4))
    found = cache.lookup(["a", "b", "c", "d"], CPU, torch.float32)
    assert [state is not None for state in found] == [True, False, True, True]
    assert cache.bytes == 48 and len(cache) == 3
    cache.store("huge", torch.zeros(100, 4))  # larger than the bound: not stored, nothing lost
    assert len(cache) == 3


def test_states_of_another_dtype_or_device_are_dropped() -> None:
    cache = PrefixCache()
    cache.lookup(["a"], CPU, torch.float32)
    cache.store("a", torch.ones(2, 4))
    assert cache.lookup(["a"], CPU, torch.float32)[0] is not None
    assert cache.lookup(["a"], CPU, torch.bfloat16) == [None]
    assert len(cache) == 0 and cache.bytes == 0


def test_a_negative_bound_is_refused() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        PrefixCache(-1)


# --- the tower ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [PromptMode.ATTENTION, PromptMode.INPUT])
def test_cached_prefix_gives_the_full_pass_outputs_and_gradients(mode: PromptMode) -> None:
    full, cached = make_deep_bert(prefix_cache_bytes=0), make_deep_bert()
    texts = [*TEXTS, TEXTS[0], "dog"]  # a repeated text and one of another length
    inputs = full.prepare(TEXT, texts)
    outputs, grads = [], []
    for tower in (full, cached):
        for _ in range(2):  # the second call reads the cache
            p = prompts(mode, [2, 3], len(texts))
            out = tower.encode(TEXT, inputs, p)
            out.pooled.square().sum().backward()
            outputs.append(out.pooled.detach())
            grads.append([p.tokens[b].grad for b in (2, 3)])
    for out, grad in zip(outputs[1:], grads[1:]):
        assert torch.allclose(out, outputs[0], atol=1e-5)
        for g, g0 in zip(grad, grads[0]):
            assert g is not None and g0 is not None and torch.allclose(g, g0, atol=1e-5)
    assert cached.prefix_cache is not None and len(cached.prefix_cache) == 4  # distinct texts


def test_blocks_below_the_first_prompted_one_run_once_per_distinct_text() -> None:
    tower = make_deep_bert()
    texts = [*TEXTS, TEXTS[0]]
    inputs = tower.prepare(TEXT, texts)
    counts = block_calls(tower)
    for _ in range(3):
        tower.encode(TEXT, inputs, prompts(PromptMode.ATTENTION, [2], len(texts)))
    assert counts == [3, 3, 12, 12]  # blocks 0-1: the 3 distinct texts once; 2-3: every call
    assert tower.model.encoder.layer is not None and len(tower.model.encoder.layer) == 4


def test_prompts_inactive_below_a_block_start_the_cache_there() -> None:
    tower = make_deep_bert()
    inputs = tower.prepare(TEXT, TEXTS)
    counts = block_calls(tower)
    mask = torch.ones(3, 3, dtype=torch.bool)
    p = prompts(PromptMode.INPUT, [1, 3], 3, mask=mask)
    p.tokens[1] = torch.zeros_like(p.tokens[1])  # input mode: all-zero tokens are inactive
    reference = make_deep_bert(prefix_cache_bytes=0).encode(TEXT, inputs, p).pooled
    assert torch.allclose(tower.encode(TEXT, inputs, p).pooled, reference, atol=1e-5)
    assert counts == [3, 3, 3, 3]  # blocks 0-2 were the prefix, computed once; block 3 ran after


@pytest.mark.parametrize("case", ["block 0", "no prompts", "trainable prefix", "no cache"])
def test_every_block_runs_when_the_cache_does_not_apply(case: str) -> None:
    tower = make_deep_bert(prefix_cache_bytes=0 if case == "no cache" else 2**20)
    inputs = tower.prepare(TEXT, TEXTS)
    p: LayerPrompts | None = prompts(PromptMode.ATTENTION, [0 if case == "block 0" else 2], 3)
    if case == "no prompts":
        p = None
    if case == "trainable prefix":  # e.g. an adapter training block 0
        tower.model.encoder.layer[0].attention.self.query.weight.requires_grad_(True)
    counts = block_calls(tower)
    for _ in range(2):
        tower.encode(TEXT, inputs, p)
    assert counts == [6, 6, 6, 6]


def test_a_peft_adapter_below_the_prompts_turns_the_cache_off() -> None:
    from peft import LoraConfig, inject_adapter_in_model

    tower = make_deep_bert()
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["query"]), tower.model)
    tower.requires_grad_(False)  # a frozen (served) adapter still switches per call
    inputs = tower.prepare(TEXT, TEXTS)
    counts = block_calls(tower)
    tower.encode(TEXT, inputs, prompts(PromptMode.ATTENTION, [2], 3))
    assert counts == [3, 3, 3, 3] and tower.prefix_cache is not None
    assert len(tower.prefix_cache) == 0


def test_the_two_block_tower_caches_block_0_for_prompts_at_block_1() -> None:
    tower = make_bert()
    inputs = tower.prepare(TEXT, TEXTS)
    counts = block_calls(tower)
    for _ in range(2):
        tower.encode(TEXT, inputs, prompts(PromptMode.INPUT, [1], 3))
    assert counts == [3, 6]
