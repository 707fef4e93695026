"""Missing-aware prompts (MAP): every missing case has its own prompts, selected by the presence mask.

With the dataset's modalities M, there are 2^|M| - 1 cases (complete, text missing, image
missing, ... for two modalities: 3). Each prompted tower keeps a (cases, blocks, P, width)
tensor (attention mode: (cases, blocks, 2, P, width)); a sample gets the slice of its case.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mllm_missing.backbones.base import Backbone
from mllm_missing.strategies.base import case_codes, case_names
from mllm_missing.strategies.map_prompts.config import MapPromptsConfig
from mllm_missing.strategies.prompting import PromptStrategy
from mllm_missing.types import Modality

__all__ = ["MapPrompts"]


class MapPrompts(PromptStrategy):
    """One prompt set per missing case and prompted tower.

    Args:
        config: the strategy's config.
        backbone: the frozen backbone.
        modalities: the dataset's modalities (the cases are built over these).
    """

    config: MapPromptsConfig

    def __init__(
        self, config: MapPromptsConfig, backbone: Backbone, modalities: Sequence[Modality]
    ) -> None:
        super().__init__(config, backbone, modalities)
        self.cases = case_names(self.data_modalities)
        self.case_prompts = nn.ParameterDict(
            {
                m.value: self.new_parameter(
                    len(self.cases), len(self.blocks[m]), *self.token_shape(m, config.prompt_length)
                )
                for m in self.towers
            }
        )

    def tokens(self, modality: Modality, presence: torch.Tensor) -> torch.Tensor:
        """Each sample's case prompts: (batch, blocks, *token_shape)."""
        codes = case_codes(presence, self.data_modalities)
        return self.case_prompts[modality.value][codes.to(self.case_prompts[modality.value].device)]
