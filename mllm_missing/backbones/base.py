"""The one protocol every frozen backbone implements, and the prompt-insertion contract.

A backbone has one tower per modality (a CLIP has an image and a text tower, an LLM a text tower).
Strategies reach into a tower through `Backbone.encode(modality, inputs, prompts)`, where
`LayerPrompts` carries tokens to insert at chosen transformer blocks:

- ``input`` mode (missing-aware prompts at the input level, VPT-deep / MAP): before block ``l``
  the tokens ``tokens[l]`` (batch, P, hidden) join the sequence; at a later prompted block they
  replace the prompt positions, otherwise those positions carry on through the blocks. They sit
  where every real token can attend to them (before the real tokens in a causal tower) and are
  dropped before pooling, so outputs keep the shape of an unprompted call.
- ``attention`` mode (prefix prompts on keys and values, MAP's attention level): ``tokens[l]``
  (batch, 2, P, hidden) are keys (index 0) and values (index 1) in the block's projected attention
  space. Each real query adds ``softmax(q K_p^T * s) V_p`` over the active prompt positions to
  its ordinary attention output, before the output projection (a separate softmax, as in
  LLaMA-Adapter), so zero values are an exact no-op; ``s`` is the block's own attention scaling
  (1/sqrt(head_dim) for Llama, BERT, CLIP, Whisper).

In both modes a prompt position is *active* where `LayerPrompts.mask` says so; by default a
position is active when its token row is not all zero. Inactive positions are never attended to.
An explicit mask holds for every block; with the default, blocks between two prompted blocks
use the activity of the last prompted one. Prompt tokens carry no positional embedding (in a
rotary model they sit at position 0, unrotated; real tokens keep positions 0..L-1), so in input
mode only the attention mask decides what they see: real tokens attend to every active
prompt position; a prompt position attends to itself and to what the tower's own masking allows
(all active positions in a bidirectional tower, earlier active prompts in a causal one).
Hence zero tokens leave a backbone's outputs unchanged (bit-identical when no position is active
anywhere in the batch; within float rounding, ~1e-5, for rows without active prompts in a mixed
batch, as fused attention kernels sum in another order), and non-zero tokens change them (the
shared test battery checks both for every backbone family).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from mllm_missing.errors import ConfigError
from mllm_missing.types import Modality

__all__ = [
    "Backbone",
    "EncoderOutput",
    "FrozenWrapper",
    "LayerPrompts",
    "PromptMode",
    "assert_frozen",
    "freeze",
    "prefix_attention",
]


class PromptMode(str, Enum):
    """Where prompt tokens enter a transformer block."""

    INPUT = "input"
    ATTENTION = "attention"


@dataclass
class LayerPrompts:
    """Tokens to insert into chosen blocks of one tower.

    Args:
        tokens: block index -> (batch, P, hidden) for ``input`` mode, or (batch, 2, P, hidden)
            (keys, values) for ``attention`` mode. P is the same for every block.
        mode: ``input`` or ``attention``.
        mask: optional bool (batch, P): the active prompt positions. By default a position is
            active at a block when its token row there is not all zero.
    """

    tokens: dict[int, torch.Tensor]
    mode: PromptMode | str = PromptMode.INPUT
    mask: torch.Tensor | None = None
    _length: int = field(init=False, default=0, repr=False)

    def __post_init__(self) -> None:
        try:
            self.mode = PromptMode(self.mode)
        except ValueError:
            raise ConfigError(
                f"prompt mode must be one of input, attention; got {self.mode!r}"
            ) from None
        if not self.tokens:
            raise ValueError("LayerPrompts needs tokens for at least one block")
        rank = 3 if self.mode is PromptMode.INPUT else 4
        lengths = set()
        for layer, tensor in self.tokens.items():
            if tensor.ndim != rank or (rank == 4 and tensor.shape[1] != 2):
                shape = "(batch, P, hidden)" if rank == 3 else "(batch, 2, P, hidden)"
                raise ValueError(
                    f"{self.mode.value} prompts for block {layer} must have shape {shape}; "
                    f"got {tuple(tensor.shape)}"
                )
            lengths.add(tensor.shape[-2])
        if len(lengths) != 1:
            raise ValueError(f"every block needs the same number of prompt tokens; got {lengths}")
        self._length = lengths.pop()

    @property
    def length(self) -> int:
        """P, the number of prompt positions."""
        return self._length

    def layers(self) -> list[int]:
        """The prompted block indices, ascending."""
        return sorted(self.tokens)

    def validate(self, num_layers: int, hidden_size: int, batch_size: int) -> None:
        """Check block indices, widths and batch sizes against a tower; errors name the block."""
        for layer, tensor in self.tokens.items():
            if not 0 <= layer < num_layers:
                raise ValueError(f"prompt block {layer} is outside 0..{num_layers - 1}")
            if tensor.shape[0] != batch_size or tensor.shape[-1] != hidden_size:
                raise ValueError(
                    f"prompts for block {layer} have batch {tensor.shape[0]} and width "
                    f"{tensor.shape[-1]}; the tower needs batch {batch_size}, width {hidden_size}"
                )
        if self.mask is not None and tuple(self.mask.shape) != (batch_size, self.length):
            raise ValueError(
                f"prompt mask must have shape ({batch_size}, {self.length}); "
                f"got {tuple(self.mask.shape)}"
            )

    def active(self, layer: int) -> torch.Tensor:
        """Bool (batch, P): the prompt positions attended to at block `layer`."""
        if self.mask is not None:
            return self.mask.bool()
        tokens = self.tokens[layer]
        if self.mode is PromptMode.ATTENTION:
            return tokens.ne(0).flatten(start_dim=3).any(dim=-1).any(dim=1)
        return tokens.ne(0).any(dim=-1)


@dataclass
class EncoderOutput:
    """What a tower returns.

    Attributes:
        pooled: (batch, embed_dim) the tower's embedding (e.g. CLIP's projected embedding).
        tokens: (batch, L, hidden_size) final token states of the real inputs (prompts removed).
        mask: optional bool (batch, L): valid (non-padding) positions of `tokens`.
    """

    pooled: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor | None = None


@runtime_checkable
class Backbone(Protocol):
    """A frozen model with one tower per modality.

    Attributes:
        name: identifier (used in cache keys and result files).
        modalities: the modalities it has a tower for.
    """

    name: str
    modalities: tuple[Modality, ...]

    def hidden_size(self, modality: Modality) -> int:
        """Width of the token sequence inside `modality`'s tower."""
        ...

    def embed_dim(self, modality: Modality) -> int:
        """Width of `modality`'s pooled embedding."""
        ...

    def num_layers(self, modality: Modality) -> int:
        """Number of transformer blocks of `modality`'s tower (0: no prompt insertion)."""
        ...

    def prepare(self, modality: Modality, raw: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Turn raw inputs (PIL images, strings, waveforms) into the tower's input tensors."""
        ...

    def encode(
        self,
        modality: Modality,
        inputs: dict[str, torch.Tensor],
        prompts: LayerPrompts | None = None,
    ) -> EncoderOutput:
        """Run `modality`'s tower, inserting `prompts` at their blocks."""
        ...

    def embed(self, modality: Modality, raw: Sequence[Any]) -> torch.Tensor:
        """Pooled embeddings (batch, embed_dim) of raw inputs, without prompts."""
        ...


def freeze(module: nn.Module) -> nn.Module:
    """Put `module` in eval mode with no parameter requiring grad; returns it."""
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


class FrozenWrapper(nn.Module):
    """Base of the wrappers around one frozen inner model, kept as ``self.model``.

    The inner model is frozen on construction and stays in eval mode whatever `train` is asked
    (no dropout, fixed batch-norm statistics); `dtype` and `device` are read from its parameters.

    Args:
        model: the model to freeze and wrap.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model: Any = freeze(model)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the model's parameters."""
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> FrozenWrapper:
        """Keep the frozen model in eval mode whatever the caller asks."""
        super().train(mode)
        self.model.eval()
        return self


def assert_frozen(module: nn.Module) -> None:
    """Raise when any parameter of `module` requires grad (a frozen backbone must not train)."""
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    if trainable:
        shown = ", ".join(trainable[:5]) + (" ..." if len(trainable) > 5 else "")
        raise RuntimeError(f"backbone is not frozen: {shown} require grad")


def prefix_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, active: torch.Tensor
) -> torch.Tensor:
    """The attention-mode prompt term, to add to a block's attention output before its projection.

    Args:
        query: (batch, heads, L, head_dim) the block's queries (after projection and any
            rotary embedding).
        keys: (batch, P, heads * head_dim) prompt keys.
        values: (batch, P, heads * head_dim) prompt values.
        active: bool (batch, P) active prompt positions.

    Returns:
        (batch, heads, L, head_dim): ``softmax(q K_p^T / sqrt(d)) V_p`` over active positions
        (zero for rows with none active).
    """
    batch, heads, _, head_dim = query.shape
    length = keys.shape[1]
    k = keys.to(query.dtype).view(batch, length, heads, head_dim).transpose(1, 2)
    v = values.to(query.dtype).view(batch, length, heads, head_dim).transpose(1, 2)
    scores = query @ k.transpose(-1, -2) / math.sqrt(head_dim)
    allowed = active.bool()[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return weights @ v
