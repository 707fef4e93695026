"""Modality-specific prompts (MSPs, Jang et al. 2024): prompts grow linearly with the modalities.

Each prompted tower keeps one (blocks, P, width) set per dataset modality, laid side by side
(|M| x P positions). A sample attends to the sets of the modalities it has: the others are
inactive positions, never attended to. MAP needs 2^|M| - 1 sets for the same information.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mllm_missing.backbones.base import Backbone
from mllm_missing.strategies.modality_prompts.config import ModalityPromptsConfig
from mllm_missing.strategies.prompting import PromptStrategy
from mllm_missing.types import MODALITY_ORDER, Modality

__all__ = ["ModalityPrompts"]


class ModalityPrompts(PromptStrategy):
    """One prompt set per modality, active where that modality is present.

    Args:
        config: the strategy's config.
        backbone: the frozen backbone.
        modalities: the dataset's modalities.
    """

    config: ModalityPromptsConfig

    def __init__(
        self, config: ModalityPromptsConfig, backbone: Backbone, modalities: Sequence[Modality]
    ) -> None:
        super().__init__(config, backbone, modalities)
        count = len(self.data_modalities)
        self.modality_prompts = nn.ParameterDict(
            {
                m.value: self.new_parameter(
                    len(self.blocks[m]), *self.token_shape(m, count * config.prompt_length)
                )
                for m in self.towers
            }
        )

    def tokens(self, modality: Modality, presence: torch.Tensor) -> torch.Tensor:
        """The same tokens for every sample: (batch, blocks, *token_shape)."""
        weights = self.modality_prompts[modality.value]
        return weights.unsqueeze(0).expand(presence.shape[0], *weights.shape)

    def active_mask(self, modality: Modality, presence: torch.Tensor) -> torch.Tensor:
        """Bool (batch, |M| x P): the positions of the modalities each sample has."""
        columns = [MODALITY_ORDER.index(m) for m in self.data_modalities]
        if not bool(presence[:, columns].any(dim=1).all()):
            raise ValueError("a row has none of the strategy's modalities")
        return presence[:, columns].bool().repeat_interleave(self.config.prompt_length, dim=1)
