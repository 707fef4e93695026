"""The offline default stack behind the Backbone protocol: EfficientNet-Lite0 + all-MiniLM-L6-v2.

The image tower is a CNN: it has no transformer blocks (``num_layers`` is 0, so prompts cannot be
inserted into it); its token states are the final feature map's cells. The text tower is MiniLM
through transformers, with prompt insertion (see `mllm_missing.backbones.hf_towers`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mllm_missing.backbones.base import EncoderOutput, LayerPrompts, freeze
from mllm_missing.backbones.offline import FrozenImageEncoder, load_default_image_encoder
from mllm_missing.types import Modality

__all__ = ["OfflineDefaultBackbone", "load_offline_default"]


class OfflineDefaultBackbone(nn.Module):
    """EfficientNet-Lite0 image tower + a text tower implementing the Backbone protocol.

    Args:
        image: the frozen EfficientNet-Lite0 encoder.
        text: the MiniLM text tower (a Backbone with a text tower).
    """

    name = "offline-default"
    modalities = (Modality.IMAGE, Modality.TEXT)

    def __init__(self, image: FrozenImageEncoder, text: Any) -> None:
        super().__init__()
        self.image = image
        self.text = text
        freeze(self)

    def train(self, mode: bool = True) -> OfflineDefaultBackbone:
        """Stay in eval mode: the towers are frozen."""
        return super().train(False)

    def hidden_size(self, modality: Modality) -> int:
        """1280 for the image tower; MiniLM's width for text."""
        if Modality.parse(modality) is Modality.IMAGE:
            return self.image.dim
        return int(self.text.hidden_size(Modality.TEXT))

    def embed_dim(self, modality: Modality) -> int:
        """Width of the pooled embedding."""
        if Modality.parse(modality) is Modality.IMAGE:
            return self.image.dim
        return int(self.text.embed_dim(Modality.TEXT))

    def num_layers(self, modality: Modality) -> int:
        """0 for the CNN image tower (no prompt insertion); MiniLM's block count for text."""
        if Modality.parse(modality) is Modality.IMAGE:
            return 0
        return int(self.text.num_layers(Modality.TEXT))

    def prepare(self, modality: Modality, raw: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Pixels for images (resized, mean = std = 0.5), token ids for text."""
        if Modality.parse(modality) is Modality.IMAGE:
            return {"pixel_values": self.image.preprocess(raw)}
        return dict(self.text.prepare(Modality.TEXT, raw))

    def encode(
        self,
        modality: Modality,
        inputs: dict[str, torch.Tensor],
        prompts: LayerPrompts | None = None,
    ) -> EncoderOutput:
        """Run one tower; prompts are refused for the image tower (it has no blocks)."""
        if Modality.parse(modality) is not Modality.IMAGE:
            return self.text.encode(Modality.TEXT, inputs, prompts)
        if prompts is not None:
            raise ValueError("the EfficientNet image tower has no transformer blocks for prompts")
        network = self.image.network
        dtype = next(network.parameters()).dtype
        features = network.extract_features(inputs["pixel_values"].to(dtype))
        tokens = features.flatten(2).transpose(1, 2)
        return EncoderOutput(pooled=tokens.mean(dim=1), tokens=tokens)

    def embed(self, modality: Modality, raw: Sequence[Any]) -> torch.Tensor:
        """Pooled embeddings of raw inputs."""
        with torch.inference_mode():
            return self.encode(modality, self.prepare(modality, raw)).pooled


def load_offline_default(
    image_size: int = 224, device: str | torch.device = "cpu", **_: Any
) -> OfflineDefaultBackbone:
    """EfficientNet-Lite0 + MiniLM from their PyPI packages, behind the Backbone protocol."""
    from mllm_missing.backbones.hf_towers import load_minilm_backbone

    image = load_default_image_encoder(image_size=image_size, device=device)
    return OfflineDefaultBackbone(image, load_minilm_backbone()).to(device)
