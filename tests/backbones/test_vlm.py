"""Tests of the frozen LLaVA-style VLM on a tiny random LLaVA (CLIP vision + Llama) saved locally."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mllm_missing.backbones.testing import (
    MULTIMODAL_CHAT_TEMPLATE,
    tiny_llama_config,
    tiny_tokenizer,
)
from mllm_missing.backbones.vlm import FrozenVLM, ModelNotFoundError, load_vlm
from mllm_missing.errors import ConfigError

IMAGE_TOKEN = "<image>"
PATCHES = 4  # a 16x16 image in 8x8 patches; the CLS token is dropped ("default" strategy)
# Renders list content (text and image items), like the chat templates LLaVA processors ship.
CORPUS = ["what colour is the shape", "a red circle and a blue square", "yes no green"] * 20


def make_tokenizer() -> Any:
    """A byte-level BPE tokenizer (~300 tokens) with chat markers and the image token."""
    return tiny_tokenizer(CORPUS, extra_special=[IMAGE_TOKEN], chat_template=None)


def make_checkpoint(folder: Path) -> Path:
    """Save a tiny random LLaVA (1-layer CLIP vision tower, 2-layer Llama) and its processor."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = make_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )
    text = tiny_llama_config(
        len(tokenizer),
        hidden_size=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=MULTIMODAL_CHAT_TEMPLATE,
    )
    processor.save_pretrained(folder)
    return folder


def make_image(seed: int) -> Any:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture
def vlm(tiny_dir: Path) -> FrozenVLM:
    return load_vlm(tiny_dir)


def prompt_inputs(vlm: FrozenVLM, images: list[Any]) -> dict[str, torch.Tensor]:
    text = vlm.chat_text("what colour is the shape", num_images=len(images[:1]))
    inputs = vlm.processor(text=[text] * len(images), images=images, return_tensors="pt")
    return dict(inputs)


def test_loads_frozen_with_processor(vlm: FrozenVLM, tiny_dir: Path) -> None:
    assert vlm.hidden_size == 32 and vlm.num_layers == 2 and vlm.dtype == torch.float32
    assert vlm.name == tiny_dir.name.lower() and vlm.source == tiny_dir
    assert vlm.processor.image_processor is not None and vlm.tokenizer is vlm.processor.tokenizer
    assert not any(p.requires_grad for p in vlm.parameters())
    vlm.train()
    assert vlm.training and not vlm.model.training


def test_backward_reaches_inputs_embeds_not_weights(vlm: FrozenVLM) -> None:
    inputs = prompt_inputs(vlm, [make_image(0)])
    before = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    embeds = vlm.embed_tokens(inputs["input_ids"]).detach().requires_grad_(True)
    soft_prompt = torch.randn(1, 3, vlm.hidden_size, requires_grad=True)
    logits = vlm(
        inputs_embeds=torch.cat([soft_prompt, embeds], dim=1),
        pixel_values=inputs["pixel_values"],
    )
    logits.logsumexp(-1).sum().backward()
    assert soft_prompt.grad is not None and soft_prompt.grad.abs().sum() > 0
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in vlm.parameters())
    torch.optim.SGD([soft_prompt], lr=1.0).step()
    for key, value in vlm.model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_inputs_embeds_path_equals_input_ids_path(vlm: FrozenVLM) -> None:
    inputs = prompt_inputs(vlm, [make_image(0), make_image(1)])
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    with torch.no_grad():
        for pixel_values in (pixels, None):
            from_ids = vlm(input_ids=ids, pixel_values=pixel_values)
            from_embeds = vlm(inputs_embeds=vlm.embed_tokens(ids), pixel_values=pixel_values)
            assert from_ids.shape == (2, ids.shape[1], len(vlm.tokenizer))
            torch.testing.assert_close(from_embeds, from_ids, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        vlm(input_ids=ids, inputs_embeds=vlm.embed_tokens(ids))


def test_image_features_are_what_the_language_model_reads(vlm: FrozenVLM) -> None:
    inputs = prompt_inputs(vlm, [make_image(0), make_image(1)])
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    with torch.no_grad():
        features = vlm.image_features(pixels)
        assert features.shape == (2, PATCHES, vlm.hidden_size)
        assert not torch.allclose(features[0], features[1])
        # Splicing the features by hand at the placeholders gives the model's own logits.
        placeholders = ids == vlm.model.config.image_token_id
        assert placeholders.sum(dim=1).tolist() == [PATCHES, PATCHES]
        embeds = vlm.embed_tokens(ids).clone()
        embeds[placeholders] = features.reshape(-1, vlm.hidden_size)
        spliced = vlm(inputs_embeds=embeds)
        torch.testing.assert_close(spliced, vlm(input_ids=ids, pixel_values=pixels))
        # ...and the image matters: the text-only logits differ at the tokens after the image.
        assert not torch.allclose(spliced, vlm(input_ids=ids), atol=1e-4)


def test_chat_with_and_without_an_image(vlm: FrozenVLM) -> None:
    question = "what colour is the shape"
    text_only = vlm.chat_text(question)
    assert IMAGE_TOKEN not in text_only
    assert vlm.chat_text(question, num_images=1).startswith(f"<|im_start|>user\n{IMAGE_TOKEN}\n")
    answer = vlm.chat(question, max_new_tokens=6)
    assert isinstance(answer, str) and vlm.chat(question, max_new_tokens=6) == answer
    with_image = vlm.chat(question, images=make_image(0), max_new_tokens=6)
    assert isinstance(with_image, str)
    assert vlm.chat(question, images=[make_image(0)], max_new_tokens=6) == with_image
    placed = [
        {
            "role": "user",
            "content": [{"type": "text", "text": question}, {"type": "image"}],
        }
    ]
    assert f"{question}{IMAGE_TOKEN}\n<|im_end|>" in vlm.chat_text(placed, num_images=1)
    assert isinstance(vlm.chat(placed, images=make_image(1), max_new_tokens=4), str)
    with pytest.raises(ValueError, match="1 image placeholders but 2 images"):
        vlm.chat(placed, images=[make_image(0), make_image(1)])
    with pytest.raises(ValueError, match="None"):
        vlm.chat(question, images=[None])


def test_bfloat16_forward_and_chat(tiny_dir: Path) -> None:
    vlm = load_vlm(tiny_dir, dtype="bfloat16")
    assert vlm.dtype == torch.bfloat16
    inputs = prompt_inputs(vlm, [make_image(0)])
    with torch.no_grad():
        logits = vlm(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
        assert vlm.image_features(inputs["pixel_values"]).dtype == torch.bfloat16
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert isinstance(vlm.chat("what colour", images=make_image(0), max_new_tokens=3), str)
    with pytest.raises(ConfigError, match="dtype"):
        load_vlm(tiny_dir, dtype="int8")


def test_missing_or_wrong_checkpoints_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="not found locally; this machine cannot download"):
        load_vlm("llava-hf/llava-1.5-7b-hf")
    with pytest.raises(ConfigError, match="not a readable checkpoint config"):
        load_vlm(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ConfigError, match="not a vision-language checkpoint"):
        load_vlm(tmp_path)


def test_missing_chat_template_fails_clearly(tiny_dir: Path) -> None:
    vlm = load_vlm(tiny_dir)
    vlm.processor.chat_template = None
    vlm.tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        vlm.chat("hi")


def test_import_does_not_load_transformers() -> None:
    code = (
        "import sys, mllm_missing, mllm_missing.backbones.vlm; "
        "assert 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
