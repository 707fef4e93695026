"""The batched inference engine and `mllm-missing predict` on a tiny CLIP model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mllm_missing.errors import ConfigError, DataFormatError
from mllm_missing.inference.engine import (
    InferenceEngine,
    ModuleChoice,
    fixed_selector,
    model_choice,
)
from mllm_missing.types import Modality, Presence, Sample

IMAGE, TEXT = Modality.IMAGE, Modality.TEXT
LABELS = ["circle", "square", "triangle"]


def tiny_clip() -> Any:
    pytest.importorskip("open_clip")
    from mllm_missing.strategies.testing import tiny_clip as build

    return build()


def tiny_model(strategy: str = "none", imputation: str = "zero", backbone: Any = None) -> Any:
    from mllm_missing.strategies.testing import tiny_classifier

    return tiny_classifier(strategy, imputation, backbone or tiny_clip(), LABELS)


def picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))


def requests() -> list[Sample]:
    """Seven requests over three patterns, interleaved, with a repeated text."""
    texts = ["a red circle", "what shape is it", "a blue square", "a red circle"]
    out = []
    for i in range(7):
        kind = ("both", "text", "image")[i % 3]
        payloads: dict[Modality, Any] = {}
        if kind in ("both", "image"):
            payloads[IMAGE] = picture(i)
        if kind in ("both", "text"):
            payloads[TEXT] = texts[i % len(texts)]
        out.append(Sample(Presence(frozenset(payloads)), payloads, id=f"r{i}"))
    return out


def reference(model: Any, sample: Sample) -> torch.Tensor:
    """One request through the model by hand: the tower (or placeholder + strategy) per
    modality, absent frozen rows zero, then the model's forward."""
    from mllm_missing.training.data import placeholder

    presence = torch.tensor([sample.presence.flags()])
    embeddings = {}
    with torch.no_grad():
        for m in model.modalities:
            present = m in sample.presence
            if model.strategy.adapts(m):
                raw = sample.payloads[m] if present else placeholder(m)
                inputs = model.backbone.prepare(m, [raw])
                embeddings[m] = model.encode(m, inputs, presence)
            elif present:
                embeddings[m] = model.backbone.embed(m, [sample.payloads[m]]).float()
            else:
                embeddings[m] = torch.zeros(1, model.backbone.embed_dim(m))
        return model(embeddings, presence)[0]


@pytest.mark.parametrize("strategy", ["none", "map_prompts"])
def test_predictions_in_request_order_equal_the_model_one_by_one(strategy: str) -> None:
    model = tiny_model(strategy)
    samples = requests()
    predictions = InferenceEngine(model, batch_size=2).predict(samples)
    assert [p.id for p in predictions] == [s.id for s in samples]
    for sample, prediction in zip(samples, predictions):
        assert prediction.presence == sample.presence
        torch.testing.assert_close(
            prediction.logits, reference(model, sample), atol=1e-4, rtol=1e-4
        )
    # patterns really differ in the outputs (a wrong reordering would be caught above)
    assert not torch.allclose(predictions[0].logits, predictions[1].logits, atol=1e-3)


def test_selector_is_asked_once_per_pattern_and_checked() -> None:
    model = tiny_model()
    asked: list[str] = []

    def selector(presence: Presence) -> ModuleChoice:
        asked.append(presence.pattern)
        return model_choice(model)

    engine = InferenceEngine(model, selector=selector, batch_size=2)
    engine.predict(requests())
    engine.predict(requests()[:3])
    assert sorted(asked) == ["image", "image+text", "text"] and engine.selector_calls == 3
    assert model_choice(model) == ModuleChoice("zero", "concat")

    wrong = InferenceEngine(model, selector=fixed_selector("knn", "gated"))
    with pytest.raises(ConfigError, match=r"chose knn\+gated for .*; loaded: zero\+concat"):
        wrong.predict(requests())


def test_a_selector_routes_patterns_to_candidate_models() -> None:
    backbone = tiny_clip()
    model = tiny_model(backbone=backbone)
    other = tiny_model(imputation="learned_token", backbone=backbone)
    with torch.no_grad():
        for p in other.classifier.parameters():
            p.add_(0.3)

    def selector(presence: Presence) -> ModuleChoice:
        return model_choice(other) if presence.pattern == "text" else model_choice(model)

    engine = InferenceEngine(model, selector=selector, candidates={model_choice(other): other})
    samples = requests()
    for sample, prediction in zip(samples, engine.predict(samples)):
        chosen = other if sample.presence.pattern == "text" else model
        assert prediction.choice == model_choice(chosen)
        torch.testing.assert_close(
            prediction.logits, reference(chosen, sample), atol=1e-4, rtol=1e-4
        )


def test_refusals_name_the_problem() -> None:
    model = tiny_model()
    with pytest.raises(ConfigError, match="batch_size must be an int >= 1"):
        InferenceEngine(model, batch_size=0)
    with pytest.raises(ConfigError, match="dtype must be one of"):
        InferenceEngine(model, dtype="int8")
    audio = Sample(Presence.of("audio"), {Modality.AUDIO: np.zeros(16000)}, id="a1")
    with pytest.raises(ConfigError, match=r"request 'a1': the model reads image, text, not audio"):
        InferenceEngine(model).predict([audio])
    assert InferenceEngine(model, dtype="float32").dtype is None
    assert InferenceEngine(model, dtype="bfloat16").dtype == torch.bfloat16


def test_rows_carry_label_names_and_scores() -> None:
    model = tiny_model()
    rows = InferenceEngine(model).predict_rows(requests()[:2])
    assert rows[0]["id"] == "r0" and rows[0]["presence"] == "image+text"
    assert rows[1]["presence"] == "text" and rows[0]["modules"] == "zero+concat"
    prediction = rows[0]["prediction"]
    assert prediction["label"] in LABELS and set(prediction["scores"]) == set(LABELS)
    assert abs(sum(prediction["scores"].values()) - 1) < 1e-4
    assert prediction["label"] == max(prediction["scores"], key=prediction["scores"].get)


def write_requests(folder: Path) -> Path:
    picture(0).save(folder / "a.png")
    (folder / "broken.png").write_text("not an image")
    lines = [
        json.dumps({"id": "both", "image": "a.png", "text": "a red circle"}),
        json.dumps({"id": "text-only", "text": "what shape is it", "image": None}),
        "",
        "{not json",
        json.dumps({"id": "empty", "text": "  "}),
        json.dumps({"id": "img", "image": str(folder / "a.png")}),
        json.dumps({"id": "bad-image", "image": "broken.png"}),
    ]
    path = folder / "requests.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_request_file_errors_name_the_line(tmp_path: Path) -> None:
    from mllm_missing.inference.predict import read_requests

    path = write_requests(tmp_path)
    with pytest.raises(DataFormatError, match=r"requests.jsonl:4: not valid JSON"):
        read_requests(path)
    read = read_requests(path, "skip")
    assert [s.id for s in read.samples] == ["both", "text-only", "img"]
    assert read.lines == [1, 2, 6]
    assert [e.line for e in read.errors] == [4, 5, 7]
    assert "every modality is missing" in read.errors[1].error
    assert "broken.png: cannot read it" in read.errors[2].error
    assert read.samples[0].presence == Presence.of("image", "text")


def test_cli_predict_writes_rows_and_skips_bad_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mllm_missing.cli import main

    backbone = tiny_clip()
    model = tiny_model(backbone=backbone)
    model.save_pretrained(tmp_path / "run" / "best")
    # the checkpoint names clip-vit-b-16, whose weights are not reachable: the tiny one stands in
    monkeypatch.setattr("mllm_missing.backbones.presets.get_backbone", lambda *a, **k: backbone)
    path = write_requests(tmp_path)
    out = tmp_path / "preds.jsonl"
    args = ["predict", "--checkpoint", str(tmp_path / "run"), "--requests", str(path)]
    assert main([*args, "--output", str(out)]) == 2
    assert "requests.jsonl:4: not valid JSON" in capsys.readouterr().err and not out.exists()

    assert main([*args, "--output", str(out), "--on-error", "skip", "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("line") for r in rows if "error" in r] == [4, 5, 7]
    good = [r for r in rows if "error" not in r]
    assert [r["id"] for r in good] == ["both", "text-only", "img"]
    assert [r["presence"] for r in good] == ["image+text", "text", "image"]
    engine = InferenceEngine(model)
    for row, expected in zip(good, engine.predict_rows(requests_from(path))):
        assert row["prediction"]["label"] == expected["prediction"]["label"]
    assert "3 predictions (3 requests skipped)" in capsys.readouterr().out


def requests_from(path: Path) -> list[Sample]:
    from mllm_missing.inference.predict import read_requests

    return read_requests(path, "skip").samples


@pytest.mark.slow
def test_dataset_samples_follow_the_seeded_mask(tmp_path: Path) -> None:
    pytest.importorskip("easy_vqa")
    from mllm_missing.inference.predict import dataset_samples

    full = dataset_samples("easy_vqa", "test", limit=20)
    assert all(s.presence == Presence.of("image", "text") for s in full)
    masked = dataset_samples("easy_vqa", "test", limit=20, missing="both:0.5", mask_root=tmp_path)
    patterns = [s.presence.pattern for s in masked]
    assert patterns.count("image") == patterns.count("text") == 5  # 10 of 20 lose one half each
    assert [s.id for s in masked] == [s.id for s in full]
    with pytest.raises(ConfigError, match="give --data-root"):
        dataset_samples("mmimdb", "test")
