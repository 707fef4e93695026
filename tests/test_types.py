"""Tests of modalities, presence masks and the Sample/Batch boundary checks."""

from __future__ import annotations

import pytest
import torch

from mllm_missing.types import (
    MODALITY_ORDER,
    Batch,
    EmptyPayloadError,
    Modality,
    Presence,
    Sample,
)


def test_modality_parse_names_allowed_values() -> None:
    assert Modality.parse(" Image ") is Modality.IMAGE
    with pytest.raises(ValueError, match="allowed: image, text, audio"):
        Modality.parse("video")


def test_presence_pattern_and_flags_round_trip() -> None:
    presence = Presence.of("text", "image")
    assert presence.pattern == "image+text"
    assert presence.flags() == [True, True, False]
    assert Presence.from_flags(torch.tensor([False, True, False])).pattern == "text"
    assert Presence.of().pattern == "none"
    assert presence.missing(MODALITY_ORDER) == {Modality.AUDIO}
    with pytest.raises(ValueError, match="3 flags"):
        Presence.from_flags([True])


@pytest.mark.parametrize("empty", [None, "", "   ", torch.zeros(0), b"", []])
def test_sample_rejects_empty_payload_marked_present(empty: object) -> None:
    with pytest.raises(EmptyPayloadError, match="text is marked present but its payload is empty"):
        Sample(presence=Presence.of("text"), payloads={"text": empty}, id="x")


def test_sample_rejects_payload_for_missing_modality_and_all_missing() -> None:
    with pytest.raises(EmptyPayloadError, match="image is marked missing"):
        Sample(presence=Presence.of("text"), payloads={"text": "hi", "image": torch.ones(3)})
    with pytest.raises(EmptyPayloadError, match="every modality is missing"):
        Sample(presence=Presence.of(), payloads={})


def test_collate_zeroes_absent_rows_and_lists_strings() -> None:
    samples = [
        Sample(
            Presence.of("image", "text"), {"image": torch.ones(2), "text": "a"}, label=1, id="0"
        ),
        Sample(Presence.of("text"), {"text": "b"}, label=0, id="1"),
        Sample(Presence.of("image"), {"image": torch.full((2,), 3.0)}, label=2, id="2"),
    ]
    batch = Batch.collate(samples)
    assert batch.presence.tolist() == [
        [True, True, False],
        [False, True, False],
        [True, False, False],
    ]
    assert batch.payloads[Modality.IMAGE].tolist() == [[1, 1], [0, 0], [3, 3]]
    assert batch.payloads[Modality.TEXT] == ["a", "b", None]
    assert Modality.AUDIO not in batch.payloads
    assert batch.labels is not None and batch.labels.tolist() == [1, 0, 2]
    assert batch.patterns() == ["image+text", "text", "image"]
    assert batch.present("image").tolist() == [True, False, True]


def test_batch_rejects_present_but_empty_and_leaked_rows() -> None:
    presence = torch.tensor([[True, True, False], [False, True, False]])
    with pytest.raises(EmptyPayloadError, match="batch row 1.*text is marked present"):
        image = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
        Batch(presence=presence, payloads={"image": image, "text": ["a", ""]})
    with pytest.raises(EmptyPayloadError, match="image is marked missing but its row is non-zero"):
        Batch(presence=presence, payloads={"image": torch.ones(2, 3), "text": ["a", "b"]})
    with pytest.raises(EmptyPayloadError, match="no image payload"):
        Batch(presence=presence, payloads={"text": ["a", "b"]})
    with pytest.raises(EmptyPayloadError, match="every modality is missing"):
        Batch(presence=torch.tensor([[False, False, False]]), payloads={})


def test_batch_shape_checks() -> None:
    with pytest.raises(ValueError, match="shape"):
        Batch(presence=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="rows"):
        Batch(presence=torch.tensor([[False, True, False]]), payloads={"text": ["a", "b"]})
    ok = Batch(presence=torch.tensor([[False, True, False]]), payloads={"text": ["a"]}, ids=["q"])
    assert len(ok) == 1 and len(ok.to("cpu")) == 1
