"""Insert `LayerPrompts` into the blocks of a transformers model (input and attention modes).

`PromptInjector` is installed once on a model's list of blocks and does nothing until a tower
activates prompts for one call (`PromptInjector.activate`, a context manager that keeps them in
a context variable and always clears them, also on exceptions):

- attention mode: the model's attention implementation (``sdpa`` or ``eager``) is replaced by a
  registered wrapper (``mllm_prompts_<base>``) that calls it unchanged and, for blocks with
  prompts in the current call, adds `prefix_attention` to its output. Blocks are found by module
  identity (not ``layer_idx``: Whisper's encoder attention has none). Scores use the block's own
  scaling: Whisper pre-scales its queries and passes ``scaling=1``, so the query is rescaled to
  give the contract's ``q K_p^T / sqrt(d)``.
- input mode: forward pre-hooks on the blocks write ``tokens[l]`` into the prompt positions and
  swap in an attention mask that hides inactive prompt positions. A causal tower runs with the P
  positions before the real tokens (the tower prepends placeholders, `causal_layout`): prompts
  get position 0, the identity rotation under RoPE (they carry no positional information, as
  base.py asks), and real tokens keep positions 0..L-1. An encoder gets the P positions appended at its first prompted block; `strip` drops
  them again.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mllm_missing.backbones.base import LayerPrompts, PromptMode, prefix_attention
from mllm_missing.errors import ConfigError

__all__ = ["WRAPPER_PREFIX", "PromptInjector"]

WRAPPER_PREFIX = "mllm_prompts_"
_BASES = ("sdpa", "eager")


@dataclass
class _Call:
    """The prompts of one tower call, and the masks derived from them (built lazily)."""

    injector: PromptInjector
    prompts: LayerPrompts
    real_mask: torch.Tensor  # bool (batch, L): attendable real positions
    sources: list[int | None]  # per block: the last prompted block at or before it
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def mask(self, source: int | None, dtype: torch.dtype) -> torch.Tensor:
        if source not in self.masks:
            self.masks[source] = self.injector._build_mask(self, source, dtype)
        return self.masks[source]


_CURRENT: ContextVar[_Call | None] = ContextVar("mllm_missing_hf_prompts", default=None)


def _eager_function(module: nn.Module) -> Callable[..., Any]:
    # Each modeling file defines its own eager attention; the attention module lives beside it.
    function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if function is None:
        raise RuntimeError(f"no eager_attention_forward next to {type(module).__qualname__}")
    return function


def _attention_wrapper(base: str) -> Callable[..., Any]:
    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        function = _eager_function(module) if base == "eager" else ALL_ATTENTION_FUNCTIONS[base]
        output, weights = function(module, query, key, value, attention_mask, *args, **kwargs)
        call = _CURRENT.get()
        if call is None or call.prompts.mode is not PromptMode.ATTENTION:
            return output, weights
        layer = call.injector._block_of.get(id(module))
        if layer is None or layer not in call.prompts.tokens:
            return output, weights
        tokens = call.prompts.tokens[layer].to(query.device)
        width = query.shape[1] * query.shape[3]
        if tokens.shape[-1] != width:
            raise ValueError(
                f"attention prompts for block {layer} have width {tokens.shape[-1]}; the block's "
                f"query space is heads * head_dim = {width}"
            )
        scaling = kwargs.get("scaling")
        factor = 1.0 if scaling is None else float(scaling) * math.sqrt(query.shape[-1])
        if factor != 1.0:
            query = query * factor
        active = call.prompts.active(layer).to(query.device)
        extra = prefix_attention(query, tokens[:, 0], tokens[:, 1], active).transpose(1, 2)
        if extra.shape != output.shape:
            raise RuntimeError(
                f"unexpected attention output layout {tuple(output.shape)} from {base}; "
                f"expected (batch, L, heads, head_dim) = {tuple(extra.shape)}"
            )
        return output + extra.to(output.dtype), weights

    return attention


def _install_attention(config: Any) -> str:
    """Switch `config` to the prompt-aware wrapper of its attention; returns the base name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    current = config._attn_implementation or "eager"
    base = current.removeprefix(WRAPPER_PREFIX)
    if base not in _BASES:
        raise ConfigError(
            f"prompt insertion supports the attention implementations {', '.join(_BASES)}; "
            f"the model uses {current!r} (load it with attn_implementation='sdpa')"
        )
    name = WRAPPER_PREFIX + base
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _attention_wrapper(base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    config._attn_implementation = name
    return base


def _positions(layer: nn.Module) -> dict[str, int]:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    parameters = inspect.signature(layer.forward).parameters.values()
    return {p.name: i for i, p in enumerate(p for p in parameters if p.kind in kinds)}


class PromptInjector:
    """Prompt insertion for one transformers model, installed on its list of blocks.

    Installing switches the model's attention implementation to a wrapper that behaves exactly
    like it outside prompted calls, and adds no-op pre-hooks to the blocks.

    Args:
        config: the config the attention modules read ``_attn_implementation`` from.
        layers: the model's blocks, in order.
        causal: prompts go before the real tokens (decoder-only LM, see `causal_layout`);
            otherwise they are appended at the first prompted block (encoder).

    Raises:
        ConfigError: the model's attention implementation is not ``sdpa`` or ``eager``.
    """

    def __init__(self, config: Any, layers: nn.ModuleList, *, causal: bool):
        self.base = _install_attention(config)
        self.causal = causal
        self.num_layers = len(layers)
        self._block_of = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
        self._positions = [_positions(layer) for layer in layers]
        self._handles = [
            layer.register_forward_pre_hook(functools.partial(self._before, i), with_kwargs=True)
            for i, layer in enumerate(layers)
        ]

    def remove(self) -> None:
        """Remove the block hooks (the attention wrapper stays: it is a pass-through)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextlib.contextmanager
    def activate(
        self, prompts: LayerPrompts | None, real_mask: torch.Tensor
    ) -> Iterator[_Call | None]:
        """Make `prompts` the current call's prompts until the block exits (also on errors).

        Prompts with no active position anywhere make a plain call (yields None), bit-identical
        to an unprompted one; and input prompts join the sequence at the first block where one
        of their positions is active. (Masked extra keys are exact in theory but change the
        float reduction order of fused attention kernels, by about 1e-6 per block.)

        Args:
            prompts: the prompts (None: a plain call).
            real_mask: bool (batch, L) real positions that may be attended to (not padding).
        """
        live = [] if prompts is None else [i for i in prompts.layers() if prompts.active(i).any()]
        if prompts is None or not live:
            yield None
            return
        sources: list[int | None] = []
        last: int | None = None
        for index in range(self.num_layers):
            last = index if index in prompts.tokens and index >= live[0] else last
            sources.append(last)
        call = _Call(self, prompts, real_mask.bool(), sources)
        token = _CURRENT.set(call)
        try:
            yield call
        finally:
            _CURRENT.reset(token)

    def causal_layout(
        self, call: _Call | None, embeds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Inputs for a causal model: ``(inputs_embeds, position_ids, attention_mask)``.

        With input prompts, P placeholder positions precede `embeds`, all at position 0; the
        4-D mask hides them until the block that first writes active prompts there. Otherwise
        `embeds` unchanged and None for positions and mask (the caller passes its 2-D mask).
        """
        if call is None or call.prompts.mode is not PromptMode.INPUT:
            return embeds, None, None
        batch, length, _ = embeds.shape
        count = call.prompts.length
        placeholders = embeds.new_zeros(batch, count, embeds.shape[-1])
        positions = torch.arange(length, device=embeds.device)
        positions = torch.cat([positions.new_zeros(count), positions]).expand(batch, -1)
        mask = call.mask(None, embeds.dtype)
        return torch.cat([placeholders, embeds], dim=1), positions, mask

    def strip(self, call: _Call | None, hidden: torch.Tensor) -> torch.Tensor:
        """Final states (batch, L, hidden) of the real positions (input prompts dropped)."""
        if call is None or call.prompts.mode is not PromptMode.INPUT:
            return hidden
        length = call.real_mask.shape[1]
        return hidden[:, call.prompts.length :] if self.causal else hidden[:, :length]

    def _build_mask(self, call: _Call, source: int | None, dtype: torch.dtype) -> torch.Tensor:
        real = call.real_mask
        batch, count = real.shape[0], call.prompts.length
        if source is None:
            active = torch.zeros(batch, count, dtype=torch.bool, device=real.device)
        else:
            active = call.prompts.active(source).to(real.device).bool()
        if self.causal:
            valid = torch.cat([active, real], dim=1)
            index = torch.arange(valid.shape[1], device=real.device)
            allowed = (index[None, :] <= index[:, None])[None] & valid[:, None, :]
            # Each prompt row also sees itself, so an inactive one never has an empty row (NaN
            # from some sdpa kernels); no real row attends to an inactive one, so zeros change nothing.
            own = torch.eye(len(index), dtype=torch.bool, device=real.device) & (index < count)
            allowed = allowed | own[None]
        else:
            valid = torch.cat([real, active], dim=1)
            allowed = valid[:, None, :].expand(batch, valid.shape[1], valid.shape[1])
        allowed = allowed[:, None]
        if self.base == "sdpa":
            return allowed
        blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=real.device)
        return torch.where(allowed, torch.zeros((), dtype=dtype, device=real.device), blocked)

    def _before(
        self, index: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        call = _CURRENT.get()
        if call is None or call.injector is not self or call.prompts.mode is not PromptMode.INPUT:
            return None
        source = call.sources[index]
        if source is None:  # before the first prompted block
            return None
        positions = self._positions[index]
        hidden = _get(args, kwargs, "hidden_states", positions)
        if index in call.prompts.tokens:
            tokens = call.prompts.tokens[index].to(device=hidden.device, dtype=hidden.dtype)
            count, length = call.prompts.length, call.real_mask.shape[1]
            if self.causal:
                hidden = torch.cat([tokens, hidden[:, count:]], dim=1)
            else:
                hidden = torch.cat([hidden[:, :length], tokens], dim=1)
            args, kwargs = _set(args, kwargs, "hidden_states", positions, hidden)
        mask = call.mask(source, hidden.dtype)
        return _set(args, kwargs, "attention_mask", positions, mask)


def _get(
    args: tuple[Any, ...], kwargs: dict[str, Any], name: str, positions: dict[str, int]
) -> Any:
    if name in kwargs:
        return kwargs[name]
    position = positions.get(name)
    if position is not None and position < len(args):
        return args[position]
    raise RuntimeError(f"a block was called without {name}")


def _set(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    name: str,
    positions: dict[str, int],
    value: Any,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    position = positions.get(name)
    if name in kwargs or position is None or position >= len(args):
        return args, {**kwargs, name: value}
    return (*args[:position], value, *args[position + 1 :]), kwargs
