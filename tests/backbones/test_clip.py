"""Tests of the open_clip CLIP backbone, on tiny random-weight models built from configs."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("open_clip", reason="open_clip_torch is in the clip extra")

from PIL import Image

from mllm_missing.backbones.base import LayerPrompts, assert_frozen
from mllm_missing.backbones.clip import CLIPBackbone, load_clip
from mllm_missing.backbones.gguf import ModelNotFoundError
from mllm_missing.backbones.testing import check_backbone
from mllm_missing.errors import ConfigError, MissingDependencyError
from mllm_missing.types import Modality

IMAGE, TEXT = Modality.IMAGE, Modality.TEXT
# The real BPE tokenizer emits ids up to 49407, so the tiny text tower keeps CLIP's vocabulary.
TINY: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
TEXTS = ["a photo of a cat", "a dog", "two small birds sitting on a wire"]


def variant(vision: dict[str, Any] | None = None, **text: Any) -> dict[str, Any]:
    """TINY with some vision/text config entries changed."""
    config = copy.deepcopy(TINY)
    config["vision_cfg"].update(vision or {})
    config["text_cfg"].update(text)
    return config


def tiny(config: dict[str, Any] = TINY, seed: int = 0) -> CLIPBackbone:
    torch.manual_seed(seed)
    return load_clip("tiny", model_cfg=config)


def images(count: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (40 + 4 * i, 48, 3), dtype=np.uint8))
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def clip() -> CLIPBackbone:
    return tiny()


@pytest.fixture(scope="module")
def pixels(clip: CLIPBackbone) -> torch.Tensor:
    return clip.prepare(IMAGE, images())["pixel_values"]


@pytest.fixture(scope="module")
def ids(clip: CLIPBackbone) -> torch.Tensor:
    return clip.prepare(TEXT, TEXTS)["input_ids"]


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> bool:
    return bool(torch.allclose(a, b, atol=atol, rtol=1e-5))


# --- the protocol and open_clip equivalence --------------------------------------------------


@pytest.mark.parametrize("modality", [IMAGE, TEXT])
def test_shared_battery(clip: CLIPBackbone, modality: Modality) -> None:
    check_backbone(clip, modality, images() if modality is IMAGE else TEXTS)


def test_sizes(clip: CLIPBackbone) -> None:
    assert clip.modalities == (IMAGE, TEXT)
    assert [clip.hidden_size(m) for m in (IMAGE, TEXT)] == [64, 64]
    assert [clip.embed_dim(m) for m in (IMAGE, TEXT)] == [32, 32]
    assert [clip.num_layers(m) for m in (IMAGE, TEXT)] == [2, 2]
    with pytest.raises(ConfigError, match="image, text"):
        clip.hidden_size(Modality.AUDIO)


CONFIGS = {
    "default": TINY,
    "attentional_pool": variant({"attentional_pool": True, "attn_pooler_queries": 4}),
    "avg_pool_ln_after": variant(
        {"pool_type": "avg", "final_ln_after_pool": True, "no_ln_pre": True, "ls_init_value": 0.5},
        no_causal_mask=True,
        pool_type="last",
        ls_init_value=0.5,
    ),
    "custom_text_pad_mask": {
        **variant(no_causal_mask=True, pool_type="eos", eos_id=49407),
        "custom_text": True,
    },
    "custom_blocks": variant({"qk_norm": True, "scale_attn": True}, scale_fc=True),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_without_prompts_equals_open_clip(name: str) -> None:
    backbone = tiny(CONFIGS[name])
    if name == "custom_text_pad_mask":
        backbone.model.text.use_pad_mask = True  # not a config field; set as open_clip would
    pixels = backbone.prepare(IMAGE, images())["pixel_values"]
    ids = backbone.prepare(TEXT, TEXTS)["input_ids"]
    with torch.no_grad():
        image = backbone.encode(IMAGE, {"pixel_values": pixels})
        text = backbone.encode(TEXT, {"input_ids": ids})
        assert close(image.pooled, backbone.model.encode_image(pixels))
        assert close(text.pooled, backbone.model.encode_text(ids))
    assert image.tokens.shape == (3, 1 + 16, 64) and image.mask is None
    assert text.tokens.shape == (3, 16, 64)
    assert text.mask is not None and torch.equal(text.mask, ids != 0)  # sot..eot, not padding


def test_custom_blocks_take_input_prompts_only(pixels: torch.Tensor) -> None:
    backbone = tiny(CONFIGS["custom_blocks"])
    inputs = {"pixel_values": pixels}
    with torch.no_grad():
        base = backbone.encode(IMAGE, inputs).pooled
        out = backbone.encode(IMAGE, inputs, LayerPrompts({1: prompt_tokens(3, 2, 0)})).pooled
        assert not close(out, base, 1e-4)
        zero = backbone.encode(IMAGE, inputs, LayerPrompts({1: torch.zeros(3, 2, 64)}))
        assert close(zero.pooled, base)
        pair = LayerPrompts({1: torch.ones(3, 2, 2, 64)}, mode="attention")
        with pytest.raises(ConfigError, match="block 1 is a CustomResidualAttentionBlock"):
            backbone.encode(IMAGE, inputs, pair)


@pytest.mark.parametrize("name", ["avg_pool_ln_after", "custom_text_pad_mask"])
def test_battery_on_other_tower_options(name: str) -> None:
    # CLIPA-like towers (no ln_pre, mean pooling then ln_post, non-causal text pooled last, layer
    # scale), and a bidirectional CustomTextCLIP text tower that masks padding (eos pooling).
    backbone = tiny(CONFIGS[name])
    if name == "custom_text_pad_mask":
        backbone.model.text.use_pad_mask = True
    check_backbone(backbone, IMAGE, images(2), check_bf16=False)
    check_backbone(backbone, TEXT, TEXTS[:2], check_bf16=False)


# --- input mode: placement, replacement, pooling ----------------------------------------------


def prompt_tokens(batch: int, count: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(batch, count, 64, generator=generator)


def vision_reference(clip: CLIPBackbone, pixels: torch.Tensor, tokens: dict[int, Any]) -> Any:
    """Append prompt tokens after the image tokens, replace them at later prompted blocks."""
    visual = clip.model.visual
    x = visual._embeds(pixels)
    length = x.shape[1]
    for index, block in enumerate(visual.transformer.resblocks):
        if index in tokens:
            x = torch.cat([x[:, :length], tokens[index]], dim=1)
        x = block(x)
    pooled, _ = visual._pool(x[:, :length])
    return pooled @ visual.proj


def text_reference(clip: CLIPBackbone, ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Prepend prompt tokens at block 0 under one causal mask; pool the real EOT token."""
    model = clip.model
    count, length = tokens.shape[1], ids.shape[1]
    x = torch.cat([tokens, model.token_embedding(ids) + model.positional_embedding], dim=1)
    causal = torch.full((count + length, count + length), float("-inf")).triu(1)
    for block in model.transformer.resblocks:
        x = block(x, attn_mask=causal)
    x = model.ln_final(x[:, count:])
    pooled = x[torch.arange(len(ids)), ids.argmax(dim=-1)]
    result: torch.Tensor = pooled @ model.text_projection
    return result


def test_image_input_prompts_match_reference(clip: CLIPBackbone, pixels: torch.Tensor) -> None:
    tokens = {0: prompt_tokens(3, 2, 1), 1: prompt_tokens(3, 2, 2)}
    with torch.no_grad():
        for layers in ([0], [1], [0, 1]):
            chosen = {layer: tokens[layer] for layer in layers}
            out = clip.encode(IMAGE, {"pixel_values": pixels}, LayerPrompts(chosen))
            assert close(out.pooled, vision_reference(clip, pixels, chosen)), layers
            assert out.tokens.shape == (3, 17, 64)


def test_text_input_prompts_precede_the_causal_text(clip: CLIPBackbone, ids: torch.Tensor) -> None:
    tokens = prompt_tokens(3, 3, 3)
    with torch.no_grad():
        out = clip.encode(TEXT, {"input_ids": ids}, LayerPrompts({0: tokens}))
        base = clip.encode(TEXT, {"input_ids": ids})
        reference = text_reference(clip, ids, tokens)
    # Prompts placed after the real tokens would be invisible to them (out == base); pooling a
    # shifted position (EOT index not corrected for the prompts) would differ from the reference.
    assert close(out.pooled, reference)
    assert not close(out.pooled, base.pooled, 1e-3)
    assert out.tokens.shape == base.tokens.shape
    # Every real position sees the prompts, the first one (SOT) included.
    assert (out.tokens - base.tokens).abs().amax(dim=-1).min() > 1e-4


def test_inactive_positions_are_never_attended(clip: CLIPBackbone, pixels, ids) -> None:
    inputs = {IMAGE: {"pixel_values": pixels}, TEXT: {"input_ids": ids}}
    for modality in (IMAGE, TEXT):
        with torch.no_grad():
            base = clip.encode(modality, inputs[modality])
            for mode, shape in (("input", (3, 2, 64)), ("attention", (3, 2, 2, 64))):
                tokens = {layer: torch.randn(shape) for layer in (0, 1)}
                off = LayerPrompts(tokens, mode=mode, mask=torch.zeros(3, 2, dtype=torch.bool))
                out = clip.encode(modality, inputs[modality], off)
                assert close(out.pooled, base.pooled) and close(out.tokens, base.tokens)
                # Half active equals the active half alone.
                half = LayerPrompts(tokens, mode=mode, mask=torch.tensor([[True, False]] * 3))
                alone = LayerPrompts({k: v[..., :1, :] for k, v in tokens.items()}, mode=mode)
                out = clip.encode(modality, inputs[modality], half)
                assert close(out.pooled, clip.encode(modality, inputs[modality], alone).pooled)


def test_zero_rows_are_inactive_per_sample(clip: CLIPBackbone, ids: torch.Tensor) -> None:
    tokens = prompt_tokens(3, 2, 4)
    tokens[1] = 0.0  # sample 1 has no prompts
    with torch.no_grad():
        out = clip.encode(TEXT, {"input_ids": ids}, LayerPrompts({0: tokens}))
        base = clip.encode(TEXT, {"input_ids": ids})
    assert close(out.pooled[1], base.pooled[1])
    assert not close(out.pooled[0], base.pooled[0], 1e-3)


# --- attention mode ---------------------------------------------------------------------------


@pytest.mark.parametrize("modality", [IMAGE, TEXT])
def test_attention_prompts_add_to_each_head_before_out_proj(
    clip: CLIPBackbone, pixels: torch.Tensor, ids: torch.Tensor, modality: Modality
) -> None:
    # With zero keys the prompt softmax is uniform: each head adds the mean of its values, so the
    # block's attention output grows by out_proj.weight @ mean(values) (no second bias).
    values = prompt_tokens(3, 2, 5)
    pair = torch.stack([torch.zeros_like(values), values], dim=1)
    if modality is IMAGE:
        tower, x = clip.model.visual, clip.model.visual._embeds(pixels)
        mask = None
    else:
        tower = clip.model
        x = tower.token_embedding(ids) + tower.positional_embedding
        mask = tower.attn_mask
    block = tower.transformer.resblocks[0]
    with torch.no_grad():
        extra = F.linear(values.mean(dim=1), block.attn.out_proj.weight)[:, None, :]
        h = x + block.ls_1(block.attention(block.ln_1(x), attn_mask=mask) + extra)
        h = h + block.ls_2(block.mlp(block.ln_2(h)))
        h = tower.transformer.resblocks[1](h, attn_mask=mask)
        if modality is IMAGE:
            reference = tower._pool(h)[0] @ tower.proj
            out = clip.encode(IMAGE, {"pixel_values": pixels}, LayerPrompts({0: pair}, "attention"))
        else:
            h = tower.ln_final(h)
            reference = h[torch.arange(3), ids.argmax(dim=-1)] @ tower.text_projection
            out = clip.encode(TEXT, {"input_ids": ids}, LayerPrompts({0: pair}, "attention"))
    assert close(out.pooled, reference)


# --- loading ----------------------------------------------------------------------------------


def test_checkpoint_path_round_trip(clip: CLIPBackbone, tmp_path: Path, pixels, ids) -> None:
    path = tmp_path / "tiny.pt"
    torch.save(clip.model.state_dict(), path)
    loaded = load_clip("tiny", path, model_cfg=TINY)
    assert loaded.name == "tiny:tiny.pt"
    with torch.no_grad():
        assert torch.equal(
            loaded.encode(IMAGE, {"pixel_values": pixels}).pooled,
            clip.encode(IMAGE, {"pixel_values": pixels}).pooled,
        )
        assert torch.equal(
            loaded.encode(TEXT, {"input_ids": ids}).pooled,
            clip.encode(TEXT, {"input_ids": ids}).pooled,
        )
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_clip("tiny", tmp_path / "absent.pt", model_cfg=TINY)


def test_local_dir_round_trip(clip: CLIPBackbone, tmp_path: Path, pixels: torch.Tensor) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in clip.model.state_dict().items()}
    save_file(state, str(tmp_path / "open_clip_model.safetensors"))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY}))
    loaded = load_clip(f"local-dir:{tmp_path}")
    assert loaded.name == f"local-dir:{tmp_path}"
    with torch.no_grad():
        assert torch.equal(
            loaded.encode(IMAGE, {"pixel_values": pixels}).pooled,
            clip.encode(IMAGE, {"pixel_values": pixels}).pooled,
        )
    assert torch.equal(
        loaded.prepare(TEXT, TEXTS)["input_ids"], clip.prepare(TEXT, TEXTS)["input_ids"]
    )


def test_unknown_model_name_fails_fast() -> None:
    with pytest.raises(ConfigError, match=r"unknown open_clip model 'ViT-B-61'.*ViT-B-16"):
        load_clip("ViT-B-61")


def test_unavailable_pretrained_tag_fails_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HOME", str(tmp_path))  # an empty ~/.cache/clip
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="not available offline; pass a local checkpoint"):
        load_clip("ViT-B-16", "laion2b_s34b_b88k")
    with pytest.raises(ModelNotFoundError, match="not available offline"):
        load_clip("ViT-B-16", "openai")
    with pytest.raises(ModelNotFoundError, match="not available offline"):
        load_clip("hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K")
    assert time.monotonic() - start < 5  # resolved from the caches, no model built, no network
    with pytest.raises(ConfigError, match="neither a checkpoint file nor an open_clip tag.*openai"):
        load_clip("ViT-B-16", "no_such_tag")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_clip("ViT-B-16", str(tmp_path / "weights.pt"))


def test_pretrained_tags_resolve_from_the_local_caches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants
    import open_clip

    from mllm_missing.backbones.clip import _cached_tag_file

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    laion = open_clip.get_pretrained_cfg("ViT-B-16", "laion2b_s34b_b88k")
    openai = open_clip.get_pretrained_cfg("ViT-B-16", "openai")
    assert _cached_tag_file(laion) is None and _cached_tag_file(openai) is None
    repo = tmp_path / "hub" / "models--laion--CLIP-ViT-B-16-laion2B-s34B-b88K"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc")
    weights = repo / "snapshots" / "abc" / "open_clip_model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")
    assert _cached_tag_file(laion) == str(weights)
    downloaded = tmp_path / ".cache" / "clip" / "ViT-B-16.pt"  # open_clip's URL download cache
    downloaded.parent.mkdir(parents=True)
    downloaded.write_bytes(b"")
    assert _cached_tag_file(openai) == str(downloaded)


def test_unsupported_towers_are_rejected_before_building() -> None:
    with pytest.raises(ConfigError, match="ViT image tower only"):
        load_clip("RN50")
    with pytest.raises(ConfigError, match="Hugging Face text towers"):
        load_clip("roberta-ViT-B-32")


def test_missing_open_clip_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'mllm-missing\[clip\]'"):
        load_clip("tiny", model_cfg=TINY)


def test_untrained_model_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="mllm_missing.backbones.clip"):
        tiny()
    assert "untrained" in caplog.text


def test_import_does_not_load_open_clip() -> None:
    code = (
        "import sys, mllm_missing, mllm_missing.backbones.clip; "
        "assert 'open_clip' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- frozen, inputs ---------------------------------------------------------------------------


def test_stays_frozen_in_train_mode(clip: CLIPBackbone) -> None:
    clip.train()
    assert not clip.model.training and not any(m.training for m in clip.model.modules())
    assert_frozen(clip)
    clip.eval()


def test_prepare_rejects_placeholders(clip: CLIPBackbone) -> None:
    with pytest.raises(ValueError, match="text 1 is empty"):
        clip.prepare(TEXT, ["a cat", "  "])
    with pytest.raises(ValueError, match="image 0 is a ndarray, not a PIL image"):
        clip.prepare(IMAGE, [np.zeros((32, 32, 3))])
    with pytest.raises(ValueError, match="input_ids"):
        clip.encode(TEXT, {"pixel_values": torch.zeros(1, 3, 32, 32)})
    pixels = clip.prepare(IMAGE, [Image.new("L", (50, 30))])["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)  # grey converted to RGB, resized and cropped
