"""Tests of the VLM towers: a tiny random LLaVA, and a ProjectorVLM over a tiny random Llama."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from mllm_missing.backbones import presets
from mllm_missing.backbones.base import LayerPrompts, assert_frozen, freeze
from mllm_missing.backbones.hf import FrozenCausalLM
from mllm_missing.backbones.offline import FrozenImageEncoder
from mllm_missing.backbones.projector_vlm import ProjectorVLM
from mllm_missing.backbones.testing import (
    MULTIMODAL_CHAT_TEMPLATE,
    check_backbone,
    tiny_llama_config,
    tiny_tokenizer,
)
from mllm_missing.backbones.vlm import FrozenVLM
from mllm_missing.backbones.vlm_towers import (
    ProjectorVLMBackbone,
    VLMBackbone,
    load_vlm_backbone,
    projector_vlm_backbone,
    vlm_backbone,
)
from mllm_missing.errors import ConfigError
from mllm_missing.types import Modality

IMAGE, TEXT = Modality.IMAGE, Modality.TEXT
IMAGE_TOKEN = "<image>"
CORPUS = ["what colour is the shape", "a red circle and a blue square", "yes no green"] * 20
TEXTS = ["what colour is the shape", "a red circle", "yes"]
VISION_HIDDEN, LM_HIDDEN, PATCHES = 16, 32, 4  # 16x16 images in 8x8 patches, plus CLS


def make_tokenizer() -> Any:
    """A byte-level BPE tokenizer (~300 tokens) with chat markers and the image token."""
    return tiny_tokenizer(
        CORPUS, extra_special=[IMAGE_TOKEN], chat_template=MULTIMODAL_CHAT_TEMPLATE
    )


def make_llava(feature_layer: int | list[int] = -1, strategy: str = "default") -> Any:
    """A tiny random LLaVA (2-block CLIP vision tower, 2-layer Llama) and its processor."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = make_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )
    text = tiny_llama_config(
        len(tokenizer),
        hidden_size=LM_HIDDEN,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
        ),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,
        chat_template=MULTIMODAL_CHAT_TEMPLATE,
    )
    return model, processor


def make_vlm(feature_layer: int | list[int] = -1, strategy: str = "default") -> FrozenVLM:
    model, processor = make_llava(feature_layer, strategy)
    return FrozenVLM(model, processor, name="tiny-llava")


def make_image(seed: int) -> Any:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


IMAGES = [make_image(0), make_image(1)]


@pytest.fixture(scope="module")
def backbone() -> VLMBackbone:
    return vlm_backbone(make_vlm())


# --- VLMBackbone -------------------------------------------------------------------------------


@pytest.mark.parametrize("modality", [IMAGE, TEXT])
def test_vlm_towers_pass_battery(backbone: VLMBackbone, modality: Modality) -> None:
    check_backbone(backbone, modality, IMAGES if modality is IMAGE else TEXTS)


def test_vlm_sizes(backbone: VLMBackbone) -> None:
    assert backbone.name == "tiny-llava" and backbone.modalities == (IMAGE, TEXT)
    assert (backbone.hidden_size(IMAGE), backbone.embed_dim(IMAGE)) == (VISION_HIDDEN, LM_HIDDEN)
    assert (backbone.hidden_size(TEXT), backbone.embed_dim(TEXT)) == (LM_HIDDEN, LM_HIDDEN)
    assert backbone.num_layers(IMAGE) == 2 and backbone.num_layers(TEXT) == 2
    # One state-dict key per weight: the VLM is held once (by the text tower).
    assert len(backbone.state_dict()) == len(backbone.vlm.model.state_dict())
    with pytest.raises(ValueError, match="image and text towers only"):
        backbone.hidden_size(Modality.AUDIO)
    with pytest.raises(ValueError, match="image 1 is None"):
        backbone.prepare(IMAGE, [IMAGES[0], None])


@pytest.mark.parametrize(
    ("feature_layer", "strategy", "layers", "positions"),
    [(-1, "default", 2, PATCHES), (-2, "default", 1, PATCHES), (-2, "full", 1, PATCHES + 1)],
)
def test_image_tower_reads_what_the_lm_reads(
    feature_layer: int, strategy: str, layers: int, positions: int
) -> None:
    vlm = make_vlm(feature_layer, strategy)
    backbone = VLMBackbone(vlm)
    inputs = backbone.prepare(IMAGE, IMAGES)
    with torch.no_grad():
        reference = vlm.image_features(inputs["pixel_values"])
        out = backbone.encode(IMAGE, inputs)
        projected = backbone.projector(out.tokens)
    assert backbone.num_layers(IMAGE) == layers
    assert out.tokens.shape == (2, positions, VISION_HIDDEN)
    torch.testing.assert_close(projected, reference, rtol=0, atol=0)
    torch.testing.assert_close(out.pooled, reference.mean(dim=1), rtol=0, atol=0)
    if layers == 1:  # LLaVA-1.5's layer -2: the last block never reaches the LM
        late = LayerPrompts({1: torch.ones(2, 3, VISION_HIDDEN)})
        with pytest.raises(ValueError, match="outside 0..0"):
            backbone.encode(IMAGE, inputs, late)


def test_image_tower_concatenates_a_list_of_feature_layers() -> None:
    vlm = make_vlm([-2, -1])
    backbone = VLMBackbone(vlm)
    inputs = backbone.prepare(IMAGE, IMAGES)
    with torch.no_grad():
        reference = vlm.image_features(inputs["pixel_values"])
        out = backbone.encode(IMAGE, inputs)
    assert backbone.num_layers(IMAGE) == 2 and out.tokens.shape == (2, PATCHES, VISION_HIDDEN)
    torch.testing.assert_close(out.pooled, reference.mean(dim=1), rtol=0, atol=0)
    prompts = LayerPrompts({0: torch.randn(2, 3, VISION_HIDDEN)})
    with torch.no_grad():
        prompted = backbone.encode(IMAGE, inputs, prompts)
    assert prompted.tokens.shape == out.tokens.shape
    assert not torch.allclose(prompted.pooled, out.pooled, atol=1e-4)


def test_text_tower_is_the_language_model(backbone: VLMBackbone) -> None:
    inputs = backbone.prepare(TEXT, TEXTS)
    language_model = backbone.vlm.model.model.language_model
    with torch.no_grad():
        out = backbone.encode(TEXT, inputs)
        states = language_model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).last_hidden_state
    last = inputs["attention_mask"].sum(dim=1) - 1
    torch.testing.assert_close(out.pooled, states[torch.arange(len(TEXTS)), last])


def test_the_vlm_stays_usable() -> None:
    vlm = make_vlm()
    inputs = vlm.processor(
        text=[vlm.chat_text("what colour is the shape", num_images=1)],
        images=IMAGES[:1],
        return_tensors="pt",
    )
    with torch.no_grad():
        before = vlm(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
    answer = vlm.chat("what colour", images=IMAGES[0], max_new_tokens=4)
    backbone = VLMBackbone(vlm)
    backbone.train()
    assert not backbone.training and not vlm.model.training
    with torch.no_grad():
        after = vlm(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert vlm.chat("what colour", images=IMAGES[0], max_new_tokens=4) == answer


def test_load_vlm_backbone_through_get_backbone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, processor = make_llava()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loader = "mllm_missing.backbones.vlm_towers:load_vlm_backbone"
    monkeypatch.setitem(presets.FAMILIES, "vlm", loader)
    loaded = presets.get_backbone("llava-1.5-7b", weights=tmp_path, dtype="bfloat16")
    assert isinstance(loaded, VLMBackbone) and loaded.name == tmp_path.name.lower()
    assert loaded.vlm.dtype == torch.bfloat16
    assert loaded.embed(IMAGE, IMAGES).shape == (2, LM_HIDDEN)
    assert loaded.embed(TEXT, TEXTS).dtype == torch.bfloat16
    direct = load_vlm_backbone(tmp_path)
    assert direct.vlm.dtype == torch.float32 and direct.num_layers(IMAGE) == 2


# --- ProjectorVLMBackbone ----------------------------------------------------------------------


def make_lm() -> FrozenCausalLM:
    """A frozen 2-layer Llama (hidden 32, random weights) with the tiny BPE tokenizer."""
    from transformers import LlamaForCausalLM

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = tiny_llama_config(
        len(tokenizer), hidden_size=LM_HIDDEN, pad_token_id=tokenizer.pad_token_id
    )
    config._attn_implementation = "sdpa"
    return FrozenCausalLM(LlamaForCausalLM(config), tokenizer, name="tiny-llama")


class FakeImageEncoder(nn.Module):
    """A fixed random linear map of the flattened image resized to 4x4 (frozen)."""

    def __init__(self, dim: int = 16, side: int = 4):
        super().__init__()
        torch.manual_seed(123)
        self.map = nn.Linear(3 * side * side, dim)
        freeze(self)
        self.dim, self.side, self.name = dim, side, "fake-encoder"

    @torch.inference_mode()  # as the real encoder: its outputs are inference tensors
    def encode(self, images: Sequence[Any]) -> torch.Tensor:
        arrays = [
            np.asarray(image.convert("RGB").resize((self.side, self.side)), dtype=np.float32)
            for image in images
        ]
        pixels = torch.from_numpy(np.stack(arrays)).flatten(start_dim=1) / 255.0
        features: torch.Tensor = self.map(pixels)
        return features


def make_efficientnet() -> FrozenImageEncoder:
    """EfficientNet-Lite0 with random weights at 32x32 (one 1280-d feature cell)."""
    efficientnet = pytest.importorskip("efficientnet_lite_pytorch")
    torch.manual_seed(0)
    network = efficientnet.EfficientNet.from_name("efficientnet-lite0", image_size=32)
    return FrozenImageEncoder(network, image_size=32)


@pytest.fixture(scope="module")
def lm() -> FrozenCausalLM:
    return make_lm()


def test_projector_vlm_text_tower_passes_battery(lm: FrozenCausalLM) -> None:
    vlm = ProjectorVLM(lm, FakeImageEncoder())
    backbone = projector_vlm_backbone(vlm)
    assert backbone.name == "fake-encoder+tiny-llama"
    assert backbone.num_layers(TEXT) == 2 and backbone.hidden_size(TEXT) == LM_HIDDEN
    check_backbone(backbone, TEXT, TEXTS)
    # The projector trains with the method: it is not part of the frozen backbone.
    projector = {id(p) for p in vlm.projector.parameters()}
    assert not projector & {id(p) for p in backbone.parameters()}
    assert all(p.requires_grad for p in vlm.trainable_parameters())


@pytest.mark.parametrize("kind", ["fake", "efficientnet"])
def test_projector_vlm_image_tower_passes_battery(lm: FrozenCausalLM, kind: str) -> None:
    encoder = FakeImageEncoder() if kind == "fake" else make_efficientnet()
    backbone = ProjectorVLMBackbone(ProjectorVLM(lm, encoder))
    assert backbone.num_layers(IMAGE) == 0
    assert backbone.hidden_size(IMAGE) == backbone.embed_dim(IMAGE) == encoder.dim
    check_backbone(backbone, IMAGE, IMAGES)
    inputs = backbone.prepare(IMAGE, IMAGES)
    out = backbone.encode(IMAGE, inputs)
    torch.testing.assert_close(out.pooled, encoder.encode(IMAGES), rtol=0, atol=1e-5)
    assert out.tokens.shape == (2, 1, encoder.dim)
    with pytest.raises(ValueError, match="no blocks for prompts"):
        backbone.encode(IMAGE, inputs, LayerPrompts({0: torch.ones(2, 3, encoder.dim)}))
    assert_frozen(backbone)


def test_projector_vlm_without_an_encoder_fails_clearly(lm: FrozenCausalLM) -> None:
    with pytest.raises(ConfigError, match="no image encoder"):
        ProjectorVLMBackbone(ProjectorVLM(lm, image_dim=16))


def test_import_does_not_load_transformers() -> None:
    code = "import sys, mllm_missing.backbones.vlm_towers; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the real stack: EfficientNet-Lite0 + SmolLM2-135M-Instruct --------------------------------


@pytest.mark.slow
def test_offline_projector_vlm_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gguf")
    loader = "mllm_missing.backbones.vlm_towers:build_offline_vlm_backbone"
    monkeypatch.setitem(presets.FAMILIES, "projector_vlm", loader)
    try:
        backbone = presets.get_backbone("smollm2-efficientnet-vlm", image_size=64)
    except (ImportError, ConfigError) as exc:  # a missing package is named in the message
        pytest.skip(str(exc))
    assert isinstance(backbone, ProjectorVLMBackbone)
    assert backbone.hidden_size(IMAGE) == 1280 and backbone.hidden_size(TEXT) == 576
    check_backbone(backbone, IMAGE, IMAGES)
    # SmolLM2 in bfloat16 is checked in test_hf_towers.py; here the float32 tower suffices.
    check_backbone(backbone, TEXT, TEXTS, check_bf16=False)
