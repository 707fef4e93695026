"""The projector half of `ProjectorVLM`: what it reads (images or their features, through a
frozen `ImageEncoder`), the `ImageProjector` MLP that turns features into LM tokens, and the
projector's files (`CONFIG_FILE` + `WEIGHTS_FILE`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

from mllm_missing.atomic import atomic_directory
from mllm_missing.errors import ConfigError, DataFormatError

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "WEIGHTS_FILE",
    "ImageEncoder",
    "ImageInput",
    "ImageProjector",
    "collect_image_features",
    "read_projector_files",
    "write_projector_files",
]

logger = logging.getLogger(__name__)

CONFIG_FILE = "projector_config.json"
WEIGHTS_FILE = "projector_model.safetensors"
FORMAT_VERSION = 1
_CONFIG_KEYS = ("image_dim", "hidden_size", "num_image_tokens", "projector_dim")

ImageInput = Any
"""One sample's image: a PIL image, an image file path, a (dim,) feature tensor, or None."""


@runtime_checkable
class ImageEncoder(Protocol):
    """A frozen image encoder: pooled features (batch, dim) for a list of PIL images."""

    dim: int

    def encode(self, images: Sequence[PILImage.Image]) -> torch.Tensor:
        """Features (batch, dim)."""
        ...


class ImageProjector(nn.Module):
    """2-layer MLP (Linear, GELU, Linear) from image features to image tokens.

    Args:
        image_dim: width of the image features.
        hidden_size: the LM's embedding width.
        num_image_tokens: image tokens produced per image.
        projector_dim: width of the middle layer (default: `hidden_size`).
    """

    def __init__(
        self,
        image_dim: int,
        hidden_size: int,
        num_image_tokens: int = 4,
        projector_dim: int | None = None,
    ):
        super().__init__()
        for field, value in (
            ("image_dim", image_dim),
            ("hidden_size", hidden_size),
            ("num_image_tokens", num_image_tokens),
            ("projector_dim", projector_dim or hidden_size),
        ):
            if value < 1:
                raise ConfigError(f"{field} must be a positive integer; got {value}")
        self.image_dim = image_dim
        self.hidden_size = hidden_size
        self.num_image_tokens = num_image_tokens
        self.projector_dim = projector_dim or hidden_size
        self.net = nn.Sequential(
            nn.Linear(image_dim, self.projector_dim),
            nn.GELU(),
            nn.Linear(self.projector_dim, num_image_tokens * hidden_size),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Image tokens (batch, num_image_tokens, hidden_size) for features (batch, image_dim)."""
        tokens: torch.Tensor = self.net(features)
        return tokens.view(features.shape[0], self.num_image_tokens, self.hidden_size)

    def config(self) -> dict[str, int]:
        """The sizes that define the projector (saved next to its weights)."""
        return {key: int(getattr(self, key)) for key in _CONFIG_KEYS}


def collect_image_features(
    batch_size: int,
    images: Sequence[ImageInput] | None = None,
    image_features: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
    *,
    dim: int,
    encoder: ImageEncoder | None,
) -> list[torch.Tensor | None]:
    """Per sample, the image's features (dim,) or None when the image is missing
    (`ProjectorVLM.encode_images`).

    Args:
        batch_size: the number of samples (every given sequence must have this length).
        images: per sample a PIL image, an image file path, a (dim,) feature tensor, or None
            (missing).
        image_features: instead of `images`: a (batch, dim) tensor, or per sample a (dim,)
            tensor or None.
        dim: the width of the features.
        encoder: encodes the images that are not features yet (None: features only).

    Raises:
        ValueError: both or mismatched lengths given, or a feature tensor of the wrong shape.
        TypeError: an image is none of the accepted kinds.
        ConfigError: images to encode but no encoder.
        DataFormatError: an image file cannot be read.
    """
    if images is not None and image_features is not None:
        raise ValueError("pass images or image_features, not both")
    items: Sequence[Any] = [None] * batch_size
    what = "images"
    if isinstance(image_features, torch.Tensor):
        if image_features.ndim != 2:
            raise ValueError(
                f"image_features must have shape (batch, dim); got {tuple(image_features.shape)}"
            )
        items, what = list(image_features.unbind(0)), "image_features"
    elif image_features is not None:
        items, what = image_features, "image_features"
    elif images is not None:
        if not isinstance(images, (list, tuple)):
            raise TypeError(
                f"images must be a list with one entry (or None) per sample; got {type(images).__name__}"
            )
        items = images
    if len(items) != batch_size:
        raise ValueError(f"got {batch_size} prompts but {len(items)} {what}")
    features: list[torch.Tensor | None] = [None] * batch_size
    to_encode: dict[int, Any] = {}
    for i, item in enumerate(items):
        if item is None:
            continue
        if isinstance(item, torch.Tensor):
            if tuple(item.shape) != (dim,):
                raise ValueError(
                    f"sample {i}: image features must have shape ({dim},); got {tuple(item.shape)}"
                )
            features[i] = item.detach()
        elif what == "image_features":
            raise TypeError(f"sample {i}: image_features entries must be tensors or None")
        else:
            to_encode[i] = _read_image(item, i)
    if to_encode:
        if encoder is None:
            raise ConfigError("images need an image_encoder; pass image_features instead")
        encoded = encoder.encode(list(to_encode.values()))
        if tuple(encoded.shape) != (len(to_encode), dim):
            raise ValueError(
                f"the image encoder returned shape {tuple(encoded.shape)}; expected "
                f"({len(to_encode)}, {dim})"
            )
        # The encoder may run under inference_mode; a clone is an ordinary tensor that
        # autograd can save for the projector's backward pass.
        encoded = encoded.detach().clone()
        for row, i in enumerate(to_encode):
            features[i] = encoded[row]
    return features


def _read_image(item: Any, index: int) -> Any:
    """A PIL image from a PIL image or an image file path; clear errors for anything else."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(item, Image.Image):
        return item
    if isinstance(item, (str, os.PathLike)):
        try:
            with Image.open(item) as opened:
                opened.load()
                return opened.copy()
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DataFormatError(f"sample {index}: cannot read image file {item} ({exc})") from exc
    raise TypeError(
        f"sample {index}: cannot read an image from a {type(item).__name__}; pass a PIL image, "
        "an image file path, a feature tensor, or None when the image is missing"
    )


def write_projector_files(
    projector: ImageProjector,
    directory: str | Path,
    *,
    marker: str,
    language_model: str,
    image_encoder: str | None,
) -> Path:
    """Write `CONFIG_FILE` and `WEIGHTS_FILE` of `projector` to `directory`, atomically (see
    `ProjectorVLM.save_projector`); the names of the models it was trained with go in the config."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    config = {
        "format_version": FORMAT_VERSION,
        **projector.config(),
        "marker": marker,
        "language_model": language_model,
        "image_encoder": image_encoder,
    }
    state = {k: v.detach().cpu().contiguous() for k, v in projector.state_dict().items()}
    with atomic_directory(directory) as partial:
        save_file(state, str(partial / WEIGHTS_FILE), metadata={"format": "pt"})
        (partial / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def read_projector_files(
    projector: ImageProjector, directory: str | Path, *, language_model: str
) -> None:
    """Load the weights in `directory` into `projector` (see `ProjectorVLM.load_projector`);
    warns when they were trained for another `language_model`."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataFormatError(f"{config_path}: not a readable projector config ({exc})") from exc
    if not isinstance(config, dict) or config.get("format_version") != FORMAT_VERSION:
        raise DataFormatError(f"{config_path}: expected format_version {FORMAT_VERSION}")
    expected = projector.config()
    for key in _CONFIG_KEYS:
        if config.get(key) != expected[key]:
            raise ConfigError(
                f"{config_path}: {key} is {config.get(key)!r} but this model needs {expected[key]}"
            )
    if config.get("language_model") != language_model:
        logger.warning(
            "projector was trained for %s; loading it into %s",
            config.get("language_model"),
            language_model,
        )
    try:
        state = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error type for a corrupt file
        raise DataFormatError(f"{weights_path}: not readable safetensors ({exc})") from exc
    projector.load_state_dict(state, strict=True)
