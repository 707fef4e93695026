"""Greedy decoding with a static KV cache, the per-token step captured once as a CUDA graph.

Plain ``generate`` in transformers spends most of a batch-1 decode step in Python and kernel
launches (a 7B model at batch 1 reaches a few percent of what the GPU's memory bandwidth allows).
`StaticDecoder` removes both: the KV cache is a fixed-size `StaticCache`, every per-step input
lives in a fixed buffer, and one decode step (model forward, argmax, buffer updates) is captured
as a CUDA graph and replayed with no host synchronisation until the last token. The prefill is an
ordinary forward pass, so learned prompts can enter through ``inputs_embeds``.

The prefill is the model's own (its mask built from the 2-D one, as in ``generate``) and each
step runs the same forward as ``generate`` with a static cache, so with the cache sized as
``generate`` sizes it (prompt + new tokens - 1) greedy outputs are those of static-cache
``generate`` bit for bit, bf16 included. Against the default dynamic cache they agree exactly in
float32 (tested); in bf16 the padded attention sums in another order, which can move a near tie
(on the H200, a 7B-shape model gave identical rows, docs/benchmarks.md).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mllm_missing.errors import ConfigError

__all__ = ["DecodeResult", "StaticDecoder"]

logger = logging.getLogger(__name__)


@dataclass
class DecodeResult:
    """What one `StaticDecoder.generate` call produced.

    Attributes:
        sequences: (batch, P + n) prompt and new tokens when ``input_ids`` were given, else
            (batch, n) new tokens only (as ``generate`` returns for ``inputs_embeds``).
        new_tokens: (batch, n) the new tokens; after a row's first ``eos`` the pad token.
        cuda_graph: whether decode steps ran as a replayed CUDA graph.
    """

    sequences: torch.Tensor
    new_tokens: torch.Tensor
    cuda_graph: bool


class _State:
    """Fixed buffers and the static cache for one batch size: what the CUDA graph reads/writes."""

    def __init__(self, model: Any, batch: int, max_length: int, device: torch.device):
        from transformers import StaticCache

        self.batch, self.max_length = batch, max_length
        self.cache = StaticCache(config=model.config, max_cache_len=max_length)
        long: dict[str, Any] = {"dtype": torch.long, "device": device}
        self.token = torch.zeros(batch, 1, **long)  # the token fed to the next step
        self.position = torch.zeros(batch, 1, **long)  # its rotary position (per row: padding)
        self.cache_position = torch.zeros(1, **long)  # the cache slot it is written to
        self.step = torch.zeros(1, **long)  # the output column it fills
        self.valid = torch.zeros(batch, max_length, dtype=torch.bool, device=device)
        self.out = torch.zeros(batch, max_length, **long)
        self.graph: Any = None  # torch.cuda.CUDAGraph once captured


class StaticDecoder:
    """Greedy decoding of a transformers causal LM with a static cache and CUDA-graph steps.

    Args:
        model: a transformers causal LM (eval mode; frozen, quantized or not).
        max_length: the static cache size: a call may take prompt length + new tokens - 1 up to
            it. ``generate`` with a static cache sizes its cache that way, and outputs agree
            bit for bit in bf16 too when the sizes are equal (the padded attention sums run
            over the same length).
        cuda_graph: capture the decode step as a CUDA graph; default: when the model is on CUDA.
            It needs the model on one device (not split by a multi-GPU ``device_map``).

    Raises:
        ConfigError: ``cuda_graph=True`` for a model not on one CUDA device, a model with flash
            attention (it takes no 4-D masks), or ``max_length < 2``.
    """

    def __init__(self, model: nn.Module, *, max_length: int, cuda_graph: bool | None = None):
        if max_length < 2:
            raise ConfigError(f"max_length must be >= 2; got {max_length}")
        self.model = model.eval()
        self.max_length = max_length
        self.dtype: torch.dtype = model.dtype  # type: ignore[assignment]
        self.device = model.get_input_embeddings().weight.device  # type: ignore[operator]
        devices = {str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}
        one_device = len(devices) <= 1
        on_cuda = self.device.type == "cuda" and one_device
        if cuda_graph and not on_cuda:
            raise ConfigError(
                "cuda_graph=True needs the model on one CUDA device; it is on "
                f"{sorted(devices) or [str(self.device)]}"
            )
        blocker = _uncapturable_layer(model)
        if cuda_graph and blocker:
            raise ConfigError(f"cuda_graph=True: {blocker}")
        self.cuda_graph = on_cuda and not blocker if cuda_graph is None else cuda_graph
        if on_cuda and blocker:
            logger.info("decoding with eager steps: %s", blocker)
        attention = str(getattr(model.config, "_attn_implementation", "sdpa"))
        if attention.startswith("flash"):
            raise ConfigError(
                f"StaticDecoder needs 'sdpa' or 'eager' attention (4-D masks); the model uses "
                f"{attention!r}"
            )
        self._additive = attention == "eager"  # eager adds the mask; sdpa takes a bool mask
        params = inspect.signature(model.forward).parameters
        self._logits_to_keep = "logits_to_keep" in params
        # transformers renamed ``past_key_values`` to ``cache`` (5.2x); take what the model has.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._states: dict[int, _State] = {}

    # -- masks -------------------------------------------------------------------------------
    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """`allowed` (bool, True: attend) in the form the model's attention takes."""
        if not self._additive:
            return allowed
        zero = torch.zeros((), dtype=self.dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(self.dtype).min)

    def _forward(self, state: _State, **inputs: Any) -> torch.Tensor:
        if self._logits_to_keep:
            inputs["logits_to_keep"] = 1
        inputs[self._cache_arg] = state.cache
        out = self.model(use_cache=True, **inputs)
        logits: torch.Tensor = out.logits[:, -1]
        return logits

    # -- one decode step: everything it reads and writes is a fixed buffer --------------------
    def _step(self, state: _State) -> None:
        state.valid.index_fill_(1, state.cache_position, True)
        mask = self._mask(state.valid[:, None, None, :])
        logits = self._forward(
            state,
            input_ids=state.token,
            attention_mask=mask,
            position_ids=state.position,
            cache_position=state.cache_position,
        )
        token = logits.argmax(-1, keepdim=True)
        state.out.index_copy_(1, state.step, token)
        state.token.copy_(token)
        state.position.add_(1)
        state.cache_position.add_(1)
        state.step.add_(1)

    def _capture(self, state: _State) -> bool:
        """Capture `_step` as a CUDA graph (the caller has just run it eagerly, as warm-up).

        Some layers cannot be captured (bitsandbytes' LLM.int8 finds its outlier columns with a
        host synchronisation): then the decoder logs why and decodes eagerly from now on.
        Capturing runs nothing, so the buffers are as the warm-up step left them either way.
        """
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._step(state)
        except RuntimeError as exc:
            logger.warning("decode step cannot be captured as a CUDA graph (%s); eager steps", exc)
            torch.cuda.synchronize(self.device)
            self.cuda_graph = False
            return False
        state.graph = graph
        return True

    def _state(self, batch: int) -> _State:
        if batch not in self._states:
            self._states[batch] = _State(self.model, batch, self.max_length, self.device)
        state = self._states[batch]
        state.cache.reset()
        return state

    # -- public ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
    ) -> DecodeResult:
        """Greedy-decode `max_new_tokens` tokens after each prompt.

        Args:
            input_ids: (batch, P) prompt tokens, left-padded when lengths differ.
            attention_mask: (batch, P) 1 for real tokens, 0 for left padding (default: all 1).
            inputs_embeds: (batch, P, hidden) prompt embeddings instead of `input_ids` (learned
                prompts prepended to token embeddings, say).
            max_new_tokens: tokens to generate per row.
            eos_token_id: end-of-sequence id(s): a row's tokens after its first one become
                `pad_token_id` and columns after every row ended are dropped, as ``generate``
                does. Decoding itself runs all steps (no host sync per step).
            pad_token_id: filler after ``eos`` (default: the first eos id).

        Raises:
            ConfigError: neither or both of `input_ids` / `inputs_embeds`, right padding, a
                prompt + `max_new_tokens` longer than `max_length`, or `max_new_tokens` < 1.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ConfigError("give exactly one of input_ids and inputs_embeds")
        prompt = input_ids if input_ids is not None else inputs_embeds
        assert prompt is not None
        batch, length = prompt.shape[0], prompt.shape[1]
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
        if length + max_new_tokens - 1 > self.max_length:  # the last token is never fed back
            raise ConfigError(
                f"prompt length {length} + max_new_tokens {max_new_tokens} - 1 exceeds the "
                f"decoder's max_length {self.max_length}"
            )
        device = self.device
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=device)
        attention_mask = attention_mask.to(device)
        if bool((attention_mask[:, -1] == 0).any()):
            raise ConfigError("attention_mask has right padding; pad prompts on the left")

        state = self._state(batch)
        state.valid.zero_()
        state.valid[:, :length] = attention_mask.bool()
        position = attention_mask.long().cumsum(-1) - 1
        position = position.masked_fill(attention_mask == 0, 1)  # as generate does
        prefill = {"input_ids": input_ids} if input_ids is not None else {}
        if inputs_embeds is not None:
            prefill["inputs_embeds"] = inputs_embeds
        # The prefill is not captured: the model builds its own mask from the 2-D one, exactly
        # as in generate (causal attention over the prompt, no padded cache in the sum).
        logits = self._forward(
            state,
            attention_mask=attention_mask,
            position_ids=position,
            cache_position=torch.arange(length, device=device),
            **{k: v.to(device) for k, v in prefill.items()},
        )
        first = logits.argmax(-1, keepdim=True)
        state.out.zero_()
        state.out[:, :1] = first
        state.token.copy_(first)
        state.position.copy_(position[:, -1:] + 1)
        state.cache_position.fill_(length)
        state.step.fill_(1)

        replayed = False
        for index in range(1, max_new_tokens):
            if self.cuda_graph and state.graph is not None:
                state.graph.replay()
                replayed = True
                continue
            if not self.cuda_graph:
                self._step(state)
                continue
            # The first step runs eagerly on a side stream as the capture's warm-up.
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                self._step(state)
            torch.cuda.current_stream(device).wait_stream(side)
            if index < max_new_tokens - 1:
                self._capture(state)
        new = state.out[:, :max_new_tokens].clone()
        new = _after_eos(new, eos_token_id, pad_token_id)
        sequences = new if input_ids is None else torch.cat([input_ids.to(device), new], dim=1)
        return DecodeResult(sequences=sequences, new_tokens=new, cuda_graph=replayed)


def _uncapturable_layer(model: nn.Module) -> str | None:
    """Why `model`'s decode step cannot be a CUDA graph, or None.

    bitsandbytes' LLM.int8 layers (outlier threshold > 0) find their outlier columns with a
    host synchronisation, which a graph capture refuses.
    """
    for name, module in model.named_modules():
        state = getattr(module, "state", None)
        if type(module).__name__ == "Linear8bitLt" and getattr(state, "threshold", 0.0) > 0:
            return f"{name} is an LLM.int8 layer (outlier threshold > 0), not capturable"
    return None


def _after_eos(
    tokens: torch.Tensor, eos_token_id: int | list[int] | None, pad_token_id: int | None
) -> torch.Tensor:
    """Tokens after each row's first eos become `pad_token_id`; trailing all-ended columns go."""
    if eos_token_id is None:
        return tokens
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not eos:
        return tokens
    pad = eos[0] if pad_token_id is None else pad_token_id
    is_eos = torch.isin(tokens, torch.tensor(eos, device=tokens.device))
    ended_before = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    tokens = tokens.masked_fill(ended_before, pad)
    ended = is_eos.long().cumsum(1) > 0
    done = ended.all(0)
    if bool(done.any()):
        last = int(done.long().argmax())  # first column where every row has ended
        tokens = tokens[:, : last + 1]
    return tokens
