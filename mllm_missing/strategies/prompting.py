"""What the prompt strategies share: their config fields, block resolution and `LayerPrompts` assembly.

A prompt strategy keeps, for every tower it acts on, a parameter tensor per prompted block and
turns a batch's presence mask into `LayerPrompts` for that tower. Subclasses only say which
tokens (and which active positions) each sample gets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mllm_missing.backbones.base import Backbone, LayerPrompts, PromptMode
from mllm_missing.errors import ConfigError
from mllm_missing.strategies.base import Strategy, StrategyConfig
from mllm_missing.types import Modality

__all__ = ["DEFAULT_PROMPT_BLOCKS", "PromptConfig", "PromptStrategy"]

#: Blocks prompted when ``prompt_layers`` is empty: the first six, as MAP does on ViLT.
DEFAULT_PROMPT_BLOCKS = 6


@dataclass
class PromptConfig(StrategyConfig):
    """Fields every prompt strategy has.

    Args:
        prompt_type: ``input`` (tokens join the sequence at their block, MAP's input level) or
            ``attention`` (key/value prefix of each prompted block, MAP's attention level).
        prompt_length: prompt positions per block and case.
        prompt_layers: blocks that get prompts, counted from 0 (negative: from the end); empty
            means the first six (or every block of a shallower tower).
        init_std: standard deviation of the ``normal`` initialisation.
    """

    prompt_type: str = "input"
    prompt_length: int = 16
    prompt_layers: tuple[int, ...] = ()
    init_std: float = 0.02

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            PromptMode(self.prompt_type)
        except ValueError:
            raise ConfigError(
                f"strategy.prompt_type must be one of input, attention; got {self.prompt_type!r}"
            ) from None
        if self.prompt_length < 1:
            raise ConfigError(f"strategy.prompt_length must be >= 1; got {self.prompt_length}")
        self.prompt_layers = tuple(int(layer) for layer in self.prompt_layers)
        if len(set(self.prompt_layers)) != len(self.prompt_layers):
            raise ConfigError(f"strategy.prompt_layers has repeats: {list(self.prompt_layers)}")
        if self.init_std <= 0:
            raise ConfigError(f"strategy.init_std must be positive; got {self.init_std}")

    @property
    def mode(self) -> PromptMode:
        """The prompt mode."""
        return PromptMode(self.prompt_type)


def resolve_blocks(config: PromptConfig, modality: Modality, num_layers: int) -> list[int]:
    """The prompted block indices of a tower with `num_layers` blocks, ascending."""
    if not config.prompt_layers:
        return list(range(min(DEFAULT_PROMPT_BLOCKS, num_layers)))
    blocks = []
    for layer in config.prompt_layers:
        index = layer + num_layers if layer < 0 else layer
        if not 0 <= index < num_layers:
            raise ConfigError(
                f"strategy.prompt_layers: block {layer} is outside the {modality.value} tower's "
                f"{num_layers} blocks (0..{num_layers - 1}, or -{num_layers}..-1)"
            )
        blocks.append(index)
    return sorted(set(blocks))


class PromptStrategy(Strategy):
    """Base of the prompt strategies.

    Subclasses implement `tokens` and may implement `active_mask`.

    Args:
        config: the strategy's config.
        backbone: the frozen backbone (widths and block counts are read from it).
        modalities: the dataset's modalities.
    """

    config: PromptConfig

    def __init__(
        self, config: PromptConfig, backbone: Backbone, modalities: Sequence[Modality]
    ) -> None:
        super().__init__(config, backbone, modalities)
        if not self.towers:
            raise ConfigError(
                f"strategy {config.method}: none of the backbone {backbone.name!r}'s towers "
                "has transformer blocks to put prompts into"
            )
        self.blocks = {m: resolve_blocks(config, m, backbone.num_layers(m)) for m in self.towers}
        self.widths = {m: backbone.hidden_size(m) for m in self.towers}

    def new_parameter(self, *shape: int) -> nn.Parameter:
        """A parameter initialised as the config says (normal with `init_std`, or zeros)."""
        tensor = torch.zeros(*shape)
        if self.config.init == "normal":
            nn.init.normal_(tensor, std=self.config.init_std)
        return nn.Parameter(tensor)

    def token_shape(self, modality: Modality, length: int) -> tuple[int, ...]:
        """Per-block token shape: (length, width) in input mode, (2, length, width) otherwise."""
        width = self.widths[modality]
        if self.config.mode is PromptMode.INPUT:
            return (length, width)
        return (2, length, width)

    def tokens(self, modality: Modality, presence: torch.Tensor) -> torch.Tensor:
        """(batch, blocks, *token_shape): every sample's tokens for each prompted block."""
        raise NotImplementedError

    def active_mask(self, modality: Modality, presence: torch.Tensor) -> torch.Tensor | None:
        """Bool (batch, P) positions that apply to each sample, or None (all of them)."""
        del modality, presence
        return None

    def prompts(self, modality: Modality, presence: torch.Tensor) -> LayerPrompts | None:
        """The `LayerPrompts` for `modality`'s tower.

        In attention mode every applicable position is active, so zero values are an exact no-op
        that still trains. In input mode a position is also active only where its tokens are not
        all zero (the backbone's default), so a zero-initialised strategy is a no-op there too.
        """
        modality = Modality.parse(modality)
        if modality not in self.towers:
            return None
        return self.layer_prompts(modality, self.tokens(modality, presence), presence)

    def layer_prompts(
        self, modality: Modality, tokens: torch.Tensor, presence: torch.Tensor
    ) -> LayerPrompts:
        """`LayerPrompts` from each sample's (batch, blocks, *token_shape) tokens."""
        mask = self.active_mask(modality, presence)
        if mask is None:
            mask = torch.ones(tokens.shape[0], tokens.shape[-2], dtype=torch.bool)
        mask = mask.to(tokens.device)
        if self.config.mode is PromptMode.INPUT:
            mask = mask & tokens.detach().ne(0).any(dim=-1).any(dim=1)
        blocks = self.blocks[modality]
        per_block = {block: tokens[:, i] for i, block in enumerate(blocks)}
        return LayerPrompts(tokens=per_block, mode=self.config.mode, mask=mask)
