"""Correlated prompts, after DCP (Shi et al., NeurIPS 2024), on the presence mask.

For each prompted tower, block by block:

- the first prompted block gets a case prompt ``P_0[case]`` plus, when ``common_dim > 0``, a
  modal-common prompt ``C[case]`` shared by every tower and projected to the tower's width (the
  *modal-common* part: one source of missing-case information for all towers);
- a later prompted block ``i`` gets ``P_i = P_{i-1} + U_i V_i P_{i-1} + D_i[case]``: generated
  from the previous block's prompts by a low-rank map (the *correlated* part; ``U_i`` starts at
  zero so training starts from repeated prompts) plus a per-case offset (the *dynamic* part,
  conditioned on which modalities are present).

DCP's dynamic part is conditioned on the input features themselves; this one is conditioned on
the presence pattern only, so prompts stay a function of the mask (and cacheable per pattern).
With ``init="zero"`` every source is zero and so is every prompt: a no-op on the backbone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mllm_missing.backbones.base import Backbone
from mllm_missing.strategies.base import case_codes, case_names
from mllm_missing.strategies.correlated_prompts.config import CorrelatedPromptsConfig
from mllm_missing.strategies.prompting import PromptStrategy
from mllm_missing.types import Modality

__all__ = ["CorrelatedPrompts"]


class CorrelatedPrompts(PromptStrategy):
    """Block prompts generated from the previous block's, with case and modal-common parts.

    Args:
        config: the strategy's config.
        backbone: the frozen backbone.
        modalities: the dataset's modalities (the cases are built over these).
    """

    config: CorrelatedPromptsConfig

    def __init__(
        self, config: CorrelatedPromptsConfig, backbone: Backbone, modalities: Sequence[Modality]
    ) -> None:
        super().__init__(config, backbone, modalities)
        self.cases = case_names(self.data_modalities)
        cases, length = len(self.cases), config.prompt_length
        self.first = nn.ParameterDict(
            {m.value: self.new_parameter(cases, *self.token_shape(m, length)) for m in self.towers}
        )
        self.offsets = nn.ParameterDict(
            {
                m.value: self.new_parameter(
                    cases, max(len(self.blocks[m]) - 1, 0), *self.token_shape(m, length)
                )
                for m in self.towers
            }
        )
        self.down = nn.ParameterDict()
        self.up = nn.ParameterDict()
        for m in self.towers:
            later = max(len(self.blocks[m]) - 1, 0)
            down = torch.empty(later, config.rank, self.widths[m])
            nn.init.normal_(down, std=self.widths[m] ** -0.5)
            self.down[m.value] = nn.Parameter(down)
            self.up[m.value] = nn.Parameter(torch.zeros(later, self.widths[m], config.rank))
        self.common: nn.Parameter | None = None
        self.common_out = nn.ModuleDict()
        if config.common_dim:
            shape = (2, length, config.common_dim) if config.mode.value == "attention" else None
            self.common = self.new_parameter(cases, *(shape or (length, config.common_dim)))
            for m in self.towers:
                self.common_out[m.value] = nn.Linear(config.common_dim, self.widths[m], bias=False)

    def tokens(self, modality: Modality, presence: torch.Tensor) -> torch.Tensor:
        """Each sample's generated prompts: (batch, blocks, *token_shape)."""
        key = modality.value
        codes = case_codes(presence, self.data_modalities).to(self.first[key].device)
        current = self.first[key][codes]
        if self.common is not None:
            current = current + self.common_out[key](self.common[codes])
        generated = [current]
        offsets = self.offsets[key][codes]
        for i in range(len(self.blocks[modality]) - 1):
            mapped = current @ self.down[key][i].T @ self.up[key][i].T
            current = current + mapped + offsets[:, i]
            generated.append(current)
        return torch.stack(generated, dim=1)
