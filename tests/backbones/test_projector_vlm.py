"""Tests of the composed VLM: a fake frozen image encoder + projector + a tiny random Llama."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from mllm_missing.backbones.base import assert_frozen, freeze
from mllm_missing.backbones.hf import FrozenCausalLM
from mllm_missing.backbones.projector_vlm import (
    CONFIG_FILE,
    IMAGE_MARKER,
    WEIGHTS_FILE,
    ProjectorVLM,
    build_offline_vlm,
)
from mllm_missing.backbones.testing import tiny_llama_config, tiny_tokenizer
from mllm_missing.errors import ConfigError, DataFormatError

CORPUS = ["what colour is the shape", "red green blue", "a red circle and a blue square"] * 20
QUESTION = "what colour is the shape"
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
IMAGE_DIM = 16


def make_lm(seed: int = 0) -> FrozenCausalLM:
    """A frozen 2-layer Llama (hidden 32, random weights) with a tiny BPE tokenizer."""
    from transformers import LlamaForCausalLM

    tokenizer = tiny_tokenizer(CORPUS)
    torch.manual_seed(seed)
    # initializer_range: wide enough that a few input tokens can steer the output
    config = tiny_llama_config(len(tokenizer), initializer_range=0.2)
    return FrozenCausalLM(LlamaForCausalLM(config), tokenizer, name="tiny-llama")


class FakeImageEncoder(nn.Module):
    """A fixed random linear map of the flattened image resized to 4x4 (frozen)."""

    def __init__(self, dim: int = IMAGE_DIM, side: int = 4):
        super().__init__()
        generator = torch.Generator().manual_seed(123)
        self.map = nn.Linear(3 * side * side, dim)
        with torch.no_grad():
            self.map.weight.copy_(torch.randn(dim, 3 * side * side, generator=generator) / side)
            self.map.bias.zero_()
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


def make_image(colour: str) -> Any:
    from PIL import Image

    return Image.new("RGB", (8, 8), COLOURS[colour])


@pytest.fixture(scope="module")
def lm() -> FrozenCausalLM:
    return make_lm()


@pytest.fixture
def vlm(lm: FrozenCausalLM) -> ProjectorVLM:
    torch.manual_seed(0)
    return ProjectorVLM(lm, FakeImageEncoder())


def last_prompt_logits(output: Any, row: int = 0) -> torch.Tensor:
    length = int(output.attention_mask[row].sum())
    logits: torch.Tensor = output.logits[row, length - 1]
    return logits


def test_only_the_projector_gets_gradients(vlm: ProjectorVLM) -> None:
    assert vlm.trainable_parameters() == list(vlm.projector.parameters())
    assert {id(p) for p in vlm.parameters() if p.requires_grad} == {
        id(p) for p in vlm.trainable_parameters()
    }
    vlm.train()
    encoder = vlm.image_encoder
    assert isinstance(encoder, FakeImageEncoder)
    assert vlm.projector.training and not vlm.lm.model.training and not encoder.training
    output = vlm([QUESTION] * 3, [make_image("red"), None, make_image("blue")], answers=["red"] * 3)
    assert output.loss is not None and output.loss.ndim == 0
    output.loss.backward()
    for name, parameter in vlm.projector.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in vlm.lm.parameters())
    assert all(p.grad is None for p in encoder.parameters())
    assert_frozen(vlm.lm)


def test_labels_cover_only_the_answer_tokens(vlm: ProjectorVLM) -> None:
    output = vlm([QUESTION, QUESTION], [make_image("red"), None], answers=["red", "blue green"])
    assert output.labels is not None
    for row, answer in enumerate(["red", "blue green"]):
        labelled = output.labels[row][output.labels[row] != -100].tolist()
        assert labelled == vlm.lm.encode(answer + "<|im_end|>")
        # The answer sits at the end of the row's real positions.
        length = int(output.attention_mask[row].sum())
        assert output.labels[row, length - len(labelled) : length].tolist() == labelled


def test_image_tokens_reach_the_lm_and_text_only_is_the_plain_prompt(
    vlm: ProjectorVLM, lm: FrozenCausalLM
) -> None:
    with torch.no_grad():
        red = vlm([QUESTION], [make_image("red")])
        blue = vlm([QUESTION], [make_image("blue")])
        missing = vlm([QUESTION], [None])
        plain = lm(input_ids=lm.apply_chat_template(QUESTION))
    assert red.logits.shape[1] == plain.shape[1] + vlm.num_image_tokens + 1  # tokens + "\n"
    assert not torch.allclose(last_prompt_logits(red), last_prompt_logits(blue), atol=1e-4)
    torch.testing.assert_close(missing.logits, plain, rtol=0, atol=1e-6)
    assert torch.equal(vlm([QUESTION]).logits, missing.logits)  # images=None: all missing


def test_mixed_batch_rows_match_single_samples(vlm: ProjectorVLM) -> None:
    images = [make_image("red"), None, make_image("green")]
    prompts = [QUESTION, "what colour", QUESTION]
    with torch.no_grad():
        batch = vlm(prompts, images)
        for row, (prompt, image) in enumerate(zip(prompts, images)):
            single = vlm([prompt], [image])
            length = single.logits.shape[1]
            assert int(batch.attention_mask[row].sum()) == length
            torch.testing.assert_close(
                batch.logits[row, :length], single.logits[0], atol=1e-5, rtol=0
            )


def test_image_tokens_sit_after_the_user_header(vlm: ProjectorVLM, lm: FrozenCausalLM) -> None:
    before, after = vlm.prompt_parts(QUESTION, with_image=True)
    assert before == "<|im_start|>user\n"
    assert after == f"\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    tokens = torch.arange(2 * lm.hidden_size, dtype=torch.float32).view(2, lm.hidden_size)
    embeds, mask, labels = vlm.build_inputs([QUESTION], [tokens])
    start = len(lm.encode(before))
    assert labels is None and int(mask.sum()) == embeds.shape[1]
    assert torch.equal(embeds[0, start : start + 2], tokens)
    assert torch.equal(embeds[0, :start], lm.embed_tokens(torch.tensor(lm.encode(before))))
    # A marker placed by the caller is where the tokens go; a missing image removes it.
    chat = [
        {"role": "system", "content": "look"},
        {"role": "user", "content": f"hi {IMAGE_MARKER}"},
    ]
    before, after = vlm.prompt_parts(chat, with_image=True)
    assert before.endswith("<|im_start|>user\nhi ")
    assert after is not None and after.startswith("<|im_end|>")
    text, none = vlm.prompt_parts(chat, with_image=False)
    assert none is None and IMAGE_MARKER not in text and "<|im_start|>user\nhi <|im_end|>" in text


def test_features_paths_and_images_give_the_same_logits(vlm: ProjectorVLM, tmp_path: Path) -> None:
    image = make_image("green")
    path = tmp_path / "green.png"
    image.save(path)
    features = vlm.image_encoder.encode([image])  # type: ignore[union-attr]
    with torch.no_grad():
        from_image = vlm([QUESTION, QUESTION], [image, None]).logits
        from_path = vlm([QUESTION, QUESTION], [str(path), None]).logits
        from_features = vlm([QUESTION, QUESTION], image_features=[features[0], None]).logits
        from_tensor = vlm([QUESTION], image_features=features).logits
    torch.testing.assert_close(from_path, from_image, rtol=0, atol=0)
    torch.testing.assert_close(from_features, from_image, rtol=0, atol=0)
    torch.testing.assert_close(from_tensor[0], from_image[0, : from_tensor.shape[1]])


def test_adam_steps_on_the_projector_reduce_the_loss(vlm: ProjectorVLM) -> None:
    colours = ["red", "green", "blue"]
    images = [make_image(colour) for colour in colours]
    optimizer = torch.optim.Adam(vlm.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = vlm([QUESTION] * 3, images, answers=colours).loss
        assert loss is not None
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    # The projector learnt to read the image: each image's own answer beats a swapped one.
    with torch.no_grad():
        right = vlm([QUESTION] * 3, images, answers=colours).loss
        swapped = vlm([QUESTION] * 3, images, answers=colours[1:] + colours[:1]).loss
    assert right is not None and swapped is not None and right < swapped
    assert_frozen(vlm.lm)


def test_save_and_load_give_identical_logits(vlm: ProjectorVLM, tmp_path: Path) -> None:
    optimizer = torch.optim.Adam(vlm.trainable_parameters(), lr=1e-2)
    loss = vlm([QUESTION], [make_image("red")], answers=["red"]).loss
    assert loss is not None
    loss.backward()
    optimizer.step()
    target = tmp_path / "projector"
    vlm.save_projector(target)
    vlm.save_projector(target)  # replacing an existing save is atomic too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["projector"]
    assert sorted(p.name for p in target.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    config = json.loads((target / CONFIG_FILE).read_text())
    assert config["num_image_tokens"] == 4 and config["image_dim"] == IMAGE_DIM
    torch.manual_seed(99)
    fresh = ProjectorVLM(vlm.lm, FakeImageEncoder())
    images = [make_image("blue"), None]
    with torch.no_grad():
        assert not torch.equal(
            fresh([QUESTION] * 2, images).logits, vlm([QUESTION] * 2, images).logits
        )
        fresh.load_projector(target)
        torch.testing.assert_close(
            fresh([QUESTION] * 2, images).logits, vlm([QUESTION] * 2, images).logits, rtol=0, atol=0
        )
    with pytest.raises(ConfigError, match="num_image_tokens is 4 but this model needs 2"):
        ProjectorVLM(vlm.lm, FakeImageEncoder(), num_image_tokens=2).load_projector(target)
    with pytest.raises(DataFormatError, match="not a readable projector config"):
        fresh.load_projector(tmp_path / "absent")


def test_bad_inputs_fail_clearly(vlm: ProjectorVLM, tmp_path: Path) -> None:
    red = make_image("red")
    with pytest.raises(ValueError, match="got 2 prompts but 3 images"):
        vlm([QUESTION] * 2, [red, red, None])
    with pytest.raises(ValueError, match="got 2 prompts but 1 answers"):
        vlm([QUESTION] * 2, [red, None], answers=["red"])
    with pytest.raises(ValueError, match="got 2 prompts but 1 image_features"):
        vlm([QUESTION] * 2, image_features=torch.zeros(1, IMAGE_DIM))
    with pytest.raises(TypeError, match="sample 1: cannot read an image from a dict"):
        vlm([QUESTION] * 2, [red, {"pixels": [1, 2]}])
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"not a png")
    with pytest.raises(DataFormatError, match="sample 0: cannot read image file"):
        vlm([QUESTION], [corrupt])
    with pytest.raises(ValueError, match=r"sample 0: image features must have shape \(16,\)"):
        vlm([QUESTION], [torch.zeros(3)])
    with pytest.raises(ValueError, match="not both"):
        vlm([QUESTION], [red], image_features=torch.zeros(1, IMAGE_DIM))
    with pytest.raises(TypeError, match="one prompt per sample"):
        vlm(QUESTION, [red])
    with pytest.raises(TypeError, match="one entry"):
        vlm([QUESTION], red)
    with pytest.raises(ValueError, match="at most once"):
        vlm([f"{IMAGE_MARKER} and {IMAGE_MARKER}"], [red])
    with pytest.raises(ValueError, match="non-empty"):
        vlm([QUESTION], [red], answers=[""])
    with pytest.raises(ConfigError, match="image_dim is needed"):
        ProjectorVLM(vlm.lm)
    with pytest.raises(ConfigError, match="need an image_encoder"):
        ProjectorVLM(vlm.lm, image_dim=IMAGE_DIM)([QUESTION], [red])


def test_generate_with_and_without_an_image(vlm: ProjectorVLM, lm: FrozenCausalLM) -> None:
    answer = vlm.generate(QUESTION, make_image("red"), max_new_tokens=6)
    assert isinstance(answer, str) and "<|im_end|>" not in answer
    assert vlm.generate(QUESTION, make_image("red"), max_new_tokens=6) == answer
    assert vlm.generate(QUESTION, max_new_tokens=6) == lm.generate(QUESTION, max_new_tokens=6)


def test_bfloat16_lm_trains_a_float32_projector() -> None:
    lm = make_lm()
    lm.model.to(torch.bfloat16)
    vlm = ProjectorVLM(lm, FakeImageEncoder())
    output = vlm([QUESTION, QUESTION], [make_image("red"), None], answers=["red", "blue"])
    assert output.logits.dtype == torch.bfloat16
    assert output.loss is not None and torch.isfinite(output.loss)
    output.loss.backward()
    assert all(p.dtype == torch.float32 and p.grad is not None for p in vlm.trainable_parameters())
    assert isinstance(vlm.generate(QUESTION, make_image("red"), max_new_tokens=3), str)


def test_import_does_not_load_transformers() -> None:
    code = (
        "import sys, mllm_missing, mllm_missing.backbones.projector_vlm; "
        "assert 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the real stack: EfficientNet-Lite0 + SmolLM2-135M-Instruct on easy-VQA --------------------


@pytest.mark.slow
def test_offline_vlm_answers_an_easy_vqa_question() -> None:
    pytest.importorskip("gguf")
    from mllm_missing.data.easy_vqa import load_easy_vqa

    try:
        vlm = build_offline_vlm()
        questions = load_easy_vqa(split="test", limit=40)
    except ImportError as exc:  # MissingDependencyError names the package to install
        pytest.skip(str(exc))
    first = questions[0]
    other = next(row for row in questions if row["image_id"] != first["image_id"])
    answer = vlm.generate(first["text"], first["image"], max_new_tokens=8)
    assert isinstance(answer, str) and answer.strip()
    with torch.no_grad():
        output = vlm([first["text"]] * 2, [first["image"], other["image"]])
    assert output.logits.shape[1] == vlm.lm.apply_chat_template(first["text"]).shape[1] + 5
    assert not torch.allclose(
        last_prompt_logits(output, 0), last_prompt_logits(output, 1), atol=1e-3
    )
