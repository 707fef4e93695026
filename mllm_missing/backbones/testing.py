"""The test battery every backbone family passes (usable for a user's own backbone too).

`check_backbone(backbone, modality, raw)` asserts that the tower is frozen (also after a backward
pass through prompts), that embeddings and token states have the declared shapes, that prompt
insertion at the first, a middle and the last block changes outputs only when the inserted
tokens are non-zero (both modes), that gradients reach the prompts, and that the tower runs in
bfloat16 close to float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mllm_missing.backbones.base import Backbone, LayerPrompts, PromptMode, assert_frozen
from mllm_missing.types import Modality

__all__ = [
    "CHAT_TEMPLATE",
    "MULTIMODAL_CHAT_TEMPLATE",
    "check_backbone",
    "tiny_llama_config",
    "tiny_tokenizer",
]


def _prompts(
    mode: PromptMode, layers: Sequence[int], batch: int, hidden: int, scale: float, seed: int
) -> LayerPrompts:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, 3, hidden) if mode is PromptMode.INPUT else (batch, 2, 3, hidden)
    tokens = {layer: scale * torch.randn(shape, generator=generator) for layer in layers}
    return LayerPrompts(tokens=tokens, mode=mode)


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> bool:
    return bool(torch.allclose(a.float(), b.float(), atol=atol, rtol=1e-5))


def check_backbone(
    backbone: Backbone, modality: Modality, raw: Sequence[Any], *, check_bf16: bool = True
) -> None:
    """Run the shared battery on one tower; raises AssertionError naming the failed check.

    Args:
        backbone: the backbone (also an `nn.Module`).
        modality: the tower to check.
        raw: at least two raw inputs for `modality`.
        check_bf16: also run the tower in bfloat16 (the backbone is cast, then its float32
            state is restored).
    """
    assert isinstance(backbone, Backbone), "does not implement the Backbone protocol"
    assert isinstance(backbone, nn.Module), "a backbone must be an nn.Module"
    assert_frozen(backbone)
    inputs = backbone.prepare(modality, raw)
    batch = len(raw)
    base = backbone.encode(modality, inputs)
    assert base.pooled.shape == (batch, backbone.embed_dim(modality)), (
        f"pooled shape {tuple(base.pooled.shape)} != ({batch}, {backbone.embed_dim(modality)})"
    )
    assert base.tokens.shape[0] == batch and base.tokens.shape[-1] == backbone.hidden_size(modality)
    assert bool(torch.isfinite(base.pooled).all()), "pooled embedding is not finite"
    embedded = backbone.embed(modality, raw)
    assert _close(embedded, base.pooled, 1e-4), "embed() differs from encode().pooled"

    layers = backbone.num_layers(modality)
    hidden = backbone.hidden_size(modality)
    if layers == 0:
        return
    before = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    for mode in PromptMode:
        for layer_set in ([0], [layers // 2], [layers - 1], sorted({0, layers - 1})):
            zero = _prompts(mode, layer_set, batch, hidden, 0.0, 0)
            out = backbone.encode(modality, inputs, zero)
            assert _close(out.pooled, base.pooled) and _close(out.tokens, base.tokens), (
                f"{mode.value} prompts of zeros at blocks {layer_set} changed the outputs"
            )
            prompts = _prompts(mode, layer_set, batch, hidden, 1.0, 1)
            for tensor in prompts.tokens.values():
                tensor.requires_grad_(True)
            out = backbone.encode(modality, inputs, prompts)
            assert out.pooled.shape == base.pooled.shape and out.tokens.shape == base.tokens.shape
            assert not _close(out.pooled, base.pooled, 1e-4), (
                f"non-zero {mode.value} prompts at blocks {layer_set} left the outputs unchanged"
            )
            out.pooled.float().pow(2).sum().backward()
            grads = [t.grad for t in prompts.tokens.values()]
            assert all(g is not None and bool(g.abs().sum() > 0) for g in grads), (
                f"no gradient reached the {mode.value} prompts at blocks {layer_set}"
            )
    assert all(p.grad is None for p in backbone.parameters()), "a backbone parameter got a grad"
    assert all(torch.equal(p, before[n]) for n, p in backbone.named_parameters()), (
        "a backbone parameter changed"
    )
    assert_frozen(backbone)

    if check_bf16:
        # Casting to bfloat16 and back rounds the weights: restore the exact float32 copy after.
        saved = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
        backbone.to(torch.bfloat16)
        try:
            low = backbone.encode(modality, backbone.prepare(modality, raw)).pooled.float()
        finally:
            backbone.to(torch.float32)
            backbone.load_state_dict(saved)
        similarity = torch.nn.functional.cosine_similarity(low, base.pooled.float(), dim=-1)
        assert bool((similarity > 0.98).all()), f"bfloat16 output drifts: cosine {similarity}"


#: ChatML-style template of the tiny test tokenizers (text-only messages).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
#: The same with ``{"type": "image"}`` / ``{"type": "text"}`` content items (VLM chats).
MULTIMODAL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer(
    corpus: Sequence[str],
    *,
    extra_special: Sequence[str] = (),
    chat_template: str | None = CHAT_TEMPLATE,
    vocab_size: int = 300,
) -> Any:
    """A byte-level BPE tokenizer trained on `corpus` (so merges exist), with ChatML markers.

    For fast tests: ``<|endoftext|>`` pads, ``<|im_start|>`` / ``<|im_end|>`` are BOS / EOS.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", *extra_special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(corpus), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_llama_config(vocab_size: int, **overrides: Any) -> Any:
    """A 2-layer Llama config (hidden 32, 4 heads, 2 key/value heads) for fast tests."""
    from transformers import LlamaConfig

    settings: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    settings.update(overrides)
    return LlamaConfig(**settings)
