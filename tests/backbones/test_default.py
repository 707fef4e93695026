"""The offline default stack behind the Backbone protocol, and `get_backbone` for offline presets."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mllm_missing.backbones.base import Backbone, LayerPrompts
from mllm_missing.backbones.offline import load_default_image_encoder
from mllm_missing.backbones.presets import get_backbone
from mllm_missing.backbones.testing import check_backbone
from mllm_missing.types import Modality

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def backbone():  # type: ignore[no-untyped-def]
    return get_backbone("offline-default", image_size=96)


def test_offline_default_passes_the_battery(backbone) -> None:  # type: ignore[no-untyped-def]
    assert isinstance(backbone, Backbone)
    texts = ["what color is the circle?", "is there a red shape?"]
    check_backbone(backbone, Modality.TEXT, texts)
    images = [Image.new("RGB", (64, 64), (200, 10, 10)), Image.new("RGB", (64, 64), (10, 10, 200))]
    check_backbone(backbone, Modality.IMAGE, images)
    assert backbone.num_layers(Modality.IMAGE) == 0 and backbone.num_layers(Modality.TEXT) == 6


def test_image_tower_matches_the_plain_encoder_and_refuses_prompts(backbone) -> None:  # type: ignore[no-untyped-def]
    images = [Image.new("RGB", (64, 64), (0, 120, 40))]
    plain = load_default_image_encoder(image_size=96).encode(images)
    assert torch.allclose(backbone.embed(Modality.IMAGE, images), plain, atol=1e-5)
    prompts = LayerPrompts({0: torch.ones(1, 2, 1280)})
    with pytest.raises(ValueError, match="no transformer blocks"):
        backbone.encode(Modality.IMAGE, backbone.prepare(Modality.IMAGE, images), prompts)
