"""The `lora` strategy: battery, peft layout, routing, default targets and the out_proj trap."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mllm_missing.errors import ConfigError
from mllm_missing.strategies.base import build_strategy, strategy_config_from_dict
from mllm_missing.strategies.testing import case_presence, check_strategy, tiny_clip, tiny_llama
from mllm_missing.types import Modality
from tests.strategies.test_battery import TEXTS, images

IMAGE, TEXT = Modality.IMAGE, Modality.TEXT
MODALITIES = (IMAGE, TEXT)


def lora(**values: Any) -> Any:
    return strategy_config_from_dict({"method": "lora", "r": 2, **values})


def clip() -> Any:
    pytest.importorskip("open_clip")
    return tiny_clip()


@pytest.mark.parametrize("routed", [False, True])
def test_battery_tiny_clip_both_towers(routed: bool) -> None:
    pytest.importorskip("open_clip")
    raw = {IMAGE: images(4), TEXT: TEXTS}
    check_strategy(lora(routed=routed), tiny_clip, raw, MODALITIES)


@pytest.mark.parametrize("routed", [False, True])
def test_battery_tiny_llama(routed: bool) -> None:
    check_strategy(lora(routed=routed), tiny_llama, {TEXT: TEXTS}, MODALITIES)


def test_config_checks_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"strategy.r must be an int >= 1; got 0"):
        lora(r=0)
    with pytest.raises(ConfigError, match="strategy.dropout"):
        lora(dropout=1.5)
    with pytest.raises(ConfigError, match="strategy.alpha"):
        lora(alpha=0)


def test_default_targets_per_family() -> None:
    backbone = clip()
    strategy = build_strategy(lora(), backbone, MODALITIES)
    assert strategy.towers == (IMAGE, TEXT)
    image = {n.rsplit(".", 1)[-1] for n in strategy.targeted[IMAGE]}
    assert image == {"out_proj", "c_fc", "c_proj"}
    assert all(n.startswith("visual.transformer.") for n in strategy.targeted[IMAGE])
    assert all(n.startswith("transformer.resblocks.") for n in strategy.targeted[TEXT])
    assert len(strategy.targeted[IMAGE]) == len(strategy.targeted[TEXT]) == 2 * 3

    llama = build_strategy(lora(), tiny_llama(), MODALITIES)
    names = {n.rsplit(".", 1)[-1] for n in llama.targeted[TEXT]}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_default_targets_bert_style() -> None:
    from mllm_missing.strategies.lora.module import default_target_modules

    names = ["layer.0.attention.self.query", "layer.0.attention.self.key"]
    names += ["layer.0.attention.self.value", "layer.0.attention.output.dense"]
    assert default_target_modules(names) == ("query", "key", "value", "dense")
    assert default_target_modules(["fc1", "fc2"]) == ()


def test_one_tower_only_and_trainable_count() -> None:
    backbone = clip()
    strategy = build_strategy(lora(modalities=["image"]), backbone, MODALITIES)
    assert strategy.adapts(IMAGE) and not strategy.adapts(TEXT)
    assert not any("lora" in n for n, _ in backbone.model.transformer.named_parameters())
    # out_proj 64->64, c_fc 64->256, c_proj 256->64 per block, rank 2, 2 blocks
    expected = 2 * 2 * ((64 + 64) + (64 + 256) + (256 + 64))
    assert sum(p.numel() for p in strategy.trainable_parameters()) == expected
    assert set(strategy.state_dict()) == {
        k for k in strategy.state_dict() if ".lora_A." in k or ".lora_B." in k
    }


def test_bad_target_lists_modules_found() -> None:
    with pytest.raises(ConfigError, match=r"no module named nope.*q_proj") as info:
        build_strategy(lora(target_modules=["nope"]), tiny_llama(), MODALITIES)
    assert "o_proj" in str(info.value) and "text tower" in str(info.value)
    with pytest.raises(ConfigError, match="bogus match no module"):
        build_strategy(lora(target_modules=["q_proj", "bogus"]), tiny_llama(), MODALITIES)


def test_a_second_lora_on_the_same_backbone_fails() -> None:
    backbone = tiny_llama()
    build_strategy(lora(), backbone, MODALITIES)
    with pytest.raises(ConfigError, match="already carries peft adapter layers"):
        build_strategy(lora(), backbone, MODALITIES)


def _set_b(strategy: Any, adapter: str, std: float) -> None:
    """Random B (a constant B adds the same shift to every channel, which LayerNorm removes)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in strategy._lora_layers:
            weight = layer.lora_B[adapter].weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * std)


@pytest.mark.parametrize("tower", [IMAGE, TEXT])
def test_out_proj_lora_is_not_bypassed(tower: Modality) -> None:
    """nn.MultiheadAttention reads out_proj.weight directly: the adapter must still apply."""
    backbone = clip()
    strategy = build_strategy(lora(target_modules=["out_proj"]), backbone, MODALITIES)
    raw = images(3) if tower is IMAGE else TEXTS[:3]
    inputs = backbone.prepare(tower, raw)
    presence = case_presence(3, MODALITIES)
    with torch.no_grad():
        before = strategy.encode(backbone, tower, inputs, presence).pooled
        _set_b(strategy, "default", 0.05)
        after = strategy.encode(backbone, tower, inputs, presence).pooled
    assert not torch.allclose(before, after, atol=1e-4)


def test_out_proj_path_matches_multihead_attention() -> None:
    """With B = 0 the manual attention path gives open_clip's own numbers."""
    backbone = clip()
    inputs = {m: backbone.prepare(m, raw) for m, raw in ((IMAGE, images(3)), (TEXT, TEXTS[:3]))}
    with torch.no_grad():
        plain = {m: backbone.encode(m, x).pooled for m, x in inputs.items()}
        build_strategy(lora(target_modules=["out_proj"]), backbone, MODALITIES)
        for m, x in inputs.items():
            torch.testing.assert_close(backbone.encode(m, x).pooled, plain[m], atol=1e-5, rtol=1e-5)


def test_save_writes_peft_layout_and_reloads(tmp_path: Path) -> None:
    backbone = clip()
    strategy = build_strategy(lora(alpha=4.0), backbone, MODALITIES)
    _set_b(strategy, "default", 0.01)
    strategy.save_files(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["r"] == 2 and saved["lora_alpha"] == 4.0 and saved["peft_type"] == "LORA"
    assert "out_proj" in saved["target_modules"] and "c_fc" in saved["target_modules"]
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.visual.transformer.resblocks.0.attn.out_proj.lora_A.weight" in keys
    assert "base_model.model.transformer.resblocks.1.mlp.c_proj.lora_B.weight" in keys

    fresh = clip()
    reloaded = build_strategy(lora(alpha=4.0), fresh, MODALITIES)
    reloaded.load_files(tmp_path)
    presence = case_presence(3, MODALITIES)
    with torch.no_grad():
        for m, raw in ((IMAGE, images(3)), (TEXT, TEXTS[:3])):
            x = backbone.prepare(m, raw)
            a = strategy.encode(backbone, m, x, presence).pooled
            b = reloaded.encode(fresh, m, x, presence).pooled
            assert torch.equal(a, b)


def test_peft_reads_the_saved_adapter(tmp_path: Path) -> None:
    """PeftModel.from_pretrained on the plain inner model gives the same outputs."""
    from peft import PeftModel

    backbone = tiny_llama()
    strategy = build_strategy(lora(), backbone, MODALITIES)
    _set_b(strategy, "default", 0.02)
    strategy.save_files(tmp_path)
    other = tiny_llama()
    PeftModel.from_pretrained(other.llm.model, str(tmp_path))
    inputs = backbone.prepare(TEXT, TEXTS)
    with torch.no_grad():
        a = backbone.encode(TEXT, inputs).pooled
        b = other.encode(TEXT, inputs).pooled
    torch.testing.assert_close(a, b)


def test_routed_layout_and_missing_file(tmp_path: Path) -> None:
    backbone = tiny_llama()
    strategy = build_strategy(lora(routed=True), backbone, MODALITIES)
    assert strategy.uses_presence and strategy.adapter_names == ["image", "text", "image+text"]
    strategy.save_files(tmp_path)
    for case in ("image", "text", "image+text"):
        assert (tmp_path / case / "adapter_config.json").is_file()
        assert (tmp_path / case / "adapter_model.safetensors").is_file()
    (tmp_path / "text" / "adapter_model.safetensors").unlink()
    fresh = build_strategy(lora(routed=True), tiny_llama(), MODALITIES)
    with pytest.raises(FileNotFoundError, match=r"text/adapter_model.safetensors"):
        fresh.load_files(tmp_path)
    shared = build_strategy(lora(), tiny_llama(), MODALITIES)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        shared.load_files(tmp_path)


def test_routed_rows_go_through_their_case_adapter() -> None:
    backbone = tiny_llama()
    strategy = build_strategy(lora(routed=True), backbone, MODALITIES)
    inputs = backbone.prepare(TEXT, TEXTS * 2)
    presence = case_presence(8, MODALITIES)  # image+text, text, image, image+text, ...
    with torch.no_grad():
        before = strategy.encode(backbone, TEXT, inputs, presence)
        _set_b(strategy, "text", 0.05)
        after = strategy.encode(backbone, TEXT, inputs, presence)
    text_only = presence[:, 1] & ~presence[:, 0]
    assert text_only.any() and (~text_only).any()
    changed = ~torch.isclose(before.pooled, after.pooled, atol=1e-5).all(dim=1)
    assert torch.equal(changed, text_only)
    # stitched back in order: unchanged rows equal an unrouted run of those rows alone
    torch.testing.assert_close(after.tokens[~text_only], before.tokens[~text_only])
    assert after.mask is not None and torch.equal(after.mask, inputs["attention_mask"].bool())
    # the shared direct path uses the complete case's adapter, left untouched
    torch.testing.assert_close(backbone.encode(TEXT, inputs).pooled, before.pooled)
