"""Retrieval-augmented prompts: what is retrieved, leave-one-out (of a row and of its group), the
neighbours' labels, the ablation, saving, refusals, and the same predictions through the
inference engine as by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mllm_missing.errors import ConfigError
from mllm_missing.strategies.base import build_strategy, strategy_config_from_dict
from mllm_missing.strategies.rag_prompts import RagPrompts
from mllm_missing.strategies.rag_prompts.module import BANK_FOLDER
from mllm_missing.types import Modality

IMAGE, TEXT = Modality.IMAGE, Modality.TEXT
LABELS = 3
pytest.importorskip("open_clip")


def tiny_backbone() -> Any:
    """The tiny CLIP the strategies are built on (the same weights every call)."""
    from mllm_missing.strategies.testing import tiny_clip

    return tiny_clip()


def strategy(**fields: Any) -> RagPrompts:
    values = {"method": "rag_prompts", "prompt_length": 2, "hidden_size": 8, "k": 1}
    values.update({"bank_dtype": "float32", **fields})
    config = strategy_config_from_dict(values)
    built = build_strategy(config, tiny_backbone(), (IMAGE, TEXT), num_labels=LABELS)
    assert isinstance(built, RagPrompts)
    return built


def presence(*rows: tuple[bool, bool]) -> torch.Tensor:
    """(rows, 3) in MODALITY_ORDER (image, text, audio) from (image, text) pairs."""
    return torch.tensor([[i, t, False] for i, t in rows])


def bank_embeddings(entries: int = 6) -> dict[Modality, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        IMAGE: torch.randn(entries, 32, generator=generator),
        TEXT: torch.randn(entries, 32, generator=generator),
    }


def fitted(**fields: Any) -> tuple[RagPrompts, dict[Modality, torch.Tensor]]:
    rag = strategy(**fields)
    bank = bank_embeddings()
    rag.fit_retrieval(bank, presence(*[(True, True)] * 6), [f"e{i}" for i in range(6)])
    return rag, bank


def test_context_is_the_retrieved_neighbours_missing_modality() -> None:
    rag, bank = fitted()
    # Row 0 lacks text, its image is entry 2's (slightly moved); row 1 lacks the image, its text
    # is entry 4's; row 2 is complete.
    queries = {
        IMAGE: torch.stack([bank[IMAGE][2] + 0.01, torch.zeros(32), bank[IMAGE][0]]),
        TEXT: torch.stack([torch.zeros(32), bank[TEXT][4], bank[TEXT][0]]),
    }
    rows = presence((True, False), (False, True), (True, True))
    context = rag.retrieval_context(queries, rows)
    assert context.shape == (3, 64)  # image slot (32) then text slot (32)
    torch.testing.assert_close(context[0, 32:], F.normalize(bank[TEXT][2], dim=0))
    torch.testing.assert_close(context[1, :32], F.normalize(bank[IMAGE][4], dim=0))
    assert not context[0, :32].any() and not context[1, 32:].any() and not context[2].any()


def test_k_neighbours_are_averaged_and_a_small_bank_gives_what_it_has() -> None:
    rag, bank = fitted(k=50)  # more than the 6 entries: all of them are averaged
    queries = {IMAGE: bank[IMAGE][:1], TEXT: torch.zeros(1, 32)}
    context = rag.retrieval_context(queries, presence((True, False)))
    torch.testing.assert_close(context[0, 32:], F.normalize(bank[TEXT].mean(0), dim=0))


def test_a_training_row_never_retrieves_itself() -> None:
    rag, bank = fitted()
    queries = {IMAGE: bank[IMAGE][3:4], TEXT: torch.zeros(1, 32)}
    own = rag.retrieval_context(queries, presence((True, False)))
    assert torch.allclose(own[0, 32:], F.normalize(bank[TEXT][3], dim=0))
    held_out = rag.retrieval_context(queries, presence((True, False)), exclude_groups=["e3"])
    assert not torch.allclose(held_out[0, 32:], own[0, 32:])


def test_the_context_changes_the_prompted_tower() -> None:
    rag, bank = fitted(init_std=0.5)
    backbone = tiny_backbone()
    inputs = backbone.prepare(TEXT, [".", "."])
    rows = presence((True, False), (True, False))
    queries = {IMAGE: bank[IMAGE][:2], TEXT: torch.zeros(2, 32)}
    context = rag.retrieval_context(queries, rows)
    with torch.no_grad():
        out = rag.encode(backbone, TEXT, inputs, rows, context).pooled
        blank = rag.encode(backbone, TEXT, inputs, rows, torch.zeros_like(context)).pooled
    assert not torch.allclose(out[0], out[1], atol=1e-5)  # other neighbours, other prompts
    assert torch.allclose(blank[0], blank[1], atol=1e-6)


def test_without_retrieval_the_context_is_zero_and_no_bank_is_built(tmp_path: Path) -> None:
    rag, bank = fitted(retrieval=False)
    assert rag.bank is None
    queries = {IMAGE: bank[IMAGE][:1], TEXT: torch.zeros(1, 32)}
    assert not rag.retrieval_context(queries, presence((True, False))).any()
    rag.save_files(tmp_path)
    assert not (tmp_path / BANK_FOLDER).exists()


def test_saved_bank_is_memory_mapped_back(tmp_path: Path) -> None:
    rag, bank = fitted(bank_dtype="float16")  # the default: half the files
    rag.save_files(tmp_path)
    again = strategy(bank_dtype="float16")
    again.load_files(tmp_path)
    assert again.bank is not None and isinstance(again.bank.arrays["image"], np.memmap)
    queries = {IMAGE: bank[IMAGE][:2], TEXT: torch.zeros(2, 32)}
    rows = presence((True, False), (True, False))
    torch.testing.assert_close(
        again.retrieval_context(queries, rows),
        rag.retrieval_context(queries, rows),
        atol=1e-3,
        rtol=1e-3,
    )  # equal up to float16 rounding


def test_refusals_name_the_problem(tmp_path: Path) -> None:
    rag = strategy()
    queries = {IMAGE: torch.randn(1, 32), TEXT: torch.zeros(1, 32)}
    with pytest.raises(RuntimeError, match="no memory bank: call fit_retrieval"):
        rag.retrieval_context(queries, presence((True, False)))
    bad = bank_embeddings()
    bad[IMAGE][1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        rag.fit_retrieval(bad, presence(*[(True, True)] * 6), [f"e{i}" for i in range(6)])
    backbone = tiny_backbone()
    inputs = backbone.prepare(TEXT, ["."])
    with pytest.raises(ValueError, match="needs each row's retrieval context"):
        rag.encode(backbone, TEXT, inputs, presence((True, False)))
    with pytest.raises(ValueError, match="retrieval context has shape"):
        rag.encode(backbone, TEXT, inputs, presence((True, False)), torch.zeros(1, 5))
    with pytest.raises(ValueError, match="has none of the strategy's modalities"):
        rag.encode(backbone, TEXT, inputs, presence((False, False)), torch.zeros(1, 64))
    with pytest.raises(FileNotFoundError, match="no strategy weights"):
        rag.load_files(tmp_path)
    rag.fit_retrieval(bank_embeddings(), presence(*[(True, True)] * 6), [f"e{i}" for i in range(6)])
    rag.save_files(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / BANK_FOLDER)
    with pytest.raises(FileNotFoundError, match="no memory bank"):
        strategy().load_files(tmp_path)
    with pytest.raises(ConfigError, match="strategy.k must be an integer >= 1"):
        strategy(k=0)


def test_a_backbone_without_a_tower_per_modality_is_refused() -> None:
    from mllm_missing.strategies.testing import tiny_llama

    config = strategy_config_from_dict({"method": "rag_prompts", "prompt_length": 2})
    with pytest.raises(ConfigError, match="has no image tower"):
        build_strategy(config, tiny_llama(), (IMAGE, TEXT))


@pytest.mark.parametrize("label_context", [False, True])
def test_engine_predictions_equal_the_model_by_hand(label_context: bool) -> None:
    """The inference engine gives a rag_prompts model its retrieval context as training does."""
    from mllm_missing.inference.engine import InferenceEngine
    from mllm_missing.strategies.testing import tiny_classifier
    from mllm_missing.training.data import placeholder
    from mllm_missing.types import Presence, Sample

    model = tiny_classifier("rag_prompts", strategy_fields={"label_context": label_context})
    rng = np.random.default_rng(0)
    pictures = [
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(5)
    ]
    texts = ["a red circle", "what shape is it", "a blue square", "is it red", "two shapes"]
    with torch.no_grad():
        frozen = {
            IMAGE: model.backbone.embed(IMAGE, pictures),
            TEXT: model.backbone.embed(TEXT, texts),
        }
    model.strategy.fit_retrieval(
        frozen, presence(*[(True, True)] * 5), [f"t{i}" for i in range(5)],
        labels=torch.tensor([0, 1, 2, 0, 1]),
    )  # fmt: skip
    samples = [
        Sample(Presence(frozenset({IMAGE})), {IMAGE: pictures[1]}, id="image only"),
        Sample(Presence(frozenset({TEXT})), {TEXT: "what shape is it"}, id="text only"),
        Sample(Presence(frozenset({IMAGE, TEXT})), {IMAGE: pictures[2], TEXT: "a blue"}, id="both"),
    ]
    predictions = InferenceEngine(model, batch_size=2).predict(samples)
    for sample, prediction in zip(samples, predictions):
        rows = torch.tensor([sample.presence.flags()])
        with torch.no_grad():
            queries = {
                m: model.backbone.embed(m, [sample.payloads[m]]).float()
                if m in sample.presence
                else torch.zeros(1, 32)
                for m in (IMAGE, TEXT)
            }
            context = model.strategy.retrieval_context(queries, rows)
            embeddings = {}
            for m in (IMAGE, TEXT):
                raw = sample.payloads.get(m, placeholder(m))
                embeddings[m] = model.encode(m, model.backbone.prepare(m, [raw]), rows, context)
            expected = model(embeddings, rows)[0]
        torch.testing.assert_close(prediction.logits, expected, atol=1e-4, rtol=1e-4)
    assert samples[0].presence != samples[1].presence


# Label context: entries e0..e5 in groups g0 (e0, e1), g1 (e2, e3), g2 (e4, e5), labelled
# 0, 1, 2, 0, 1, 2.
GROUPS = ["g0", "g0", "g1", "g1", "g2", "g2"]


def labelled(**fields: Any) -> tuple[RagPrompts, dict[Modality, torch.Tensor]]:
    rag = strategy(label_context=True, **fields)
    bank = bank_embeddings()
    rag.fit_retrieval(
        bank, presence(*[(True, True)] * 6), [f"e{i}" for i in range(6)],
        groups=GROUPS, labels=torch.tensor([0, 1, 2, 0, 1, 2]),
    )  # fmt: skip
    return rag, bank


def nearest(bank: torch.Tensor, query: torch.Tensor, k: int, skip: set[int]) -> list[int]:
    """The k entries of `bank` with the highest cosine to `query`, leaving out `skip`."""
    scores = F.normalize(bank, dim=1) @ F.normalize(query, dim=0)
    order = [i for i in scores.argsort(descending=True).tolist() if i not in skip]
    return order[:k]


def test_label_context_is_the_neighbours_label_mean_for_each_present_modality() -> None:
    rag, bank = labelled(k=2)
    assert rag.context_dim == 64 + 2 * LABELS
    query_image, query_text = bank[IMAGE][2] + 0.3, bank[TEXT][5] - 0.2
    queries = {
        IMAGE: torch.stack([query_image, query_image]),
        TEXT: torch.stack([query_text, torch.zeros(32)]),
    }
    rows = presence((True, True), (True, False))
    context = rag.retrieval_context(queries, rows)
    labels = F.one_hot(torch.tensor([0, 1, 2, 0, 1, 2]), LABELS).float()
    by_image = labels[nearest(bank[IMAGE], query_image, 2, set())].mean(0)
    by_text = labels[nearest(bank[TEXT], query_text, 2, set())].mean(0)
    image_slot, text_slot = slice(64, 64 + LABELS), slice(64 + LABELS, 64 + 2 * LABELS)
    torch.testing.assert_close(context[0, image_slot], by_image)
    torch.testing.assert_close(context[0, text_slot], by_text)
    torch.testing.assert_close(context[1, image_slot], by_image)
    assert not context[1, text_slot].any()  # no text: nothing retrieved by it
    assert not context[0, :64].any()  # complete: no stand-in, labels only


def test_a_training_row_never_retrieves_its_own_group() -> None:
    rag, bank = labelled(k=2)
    # Entry e2's own image; its group g1 (e2, e3) must be left out as a whole.
    queries = {IMAGE: bank[IMAGE][2:3], TEXT: torch.zeros(1, 32)}
    context = rag.retrieval_context(queries, presence((True, False)), exclude_groups=["g1"])
    labels = F.one_hot(torch.tensor([0, 1, 2, 0, 1, 2]), LABELS).float()
    expected = labels[nearest(bank[IMAGE], bank[IMAGE][2], 2, {2, 3})].mean(0)
    torch.testing.assert_close(context[0, 64 : 64 + LABELS], expected)
    stand_in = bank[TEXT][nearest(bank[IMAGE], bank[IMAGE][2], 2, {2, 3})].mean(0)
    torch.testing.assert_close(context[0, 32:64], F.normalize(stand_in, dim=0))


def test_label_context_refusals() -> None:
    config = strategy_config_from_dict(
        {"method": "rag_prompts", "prompt_length": 2, "hidden_size": 8, "label_context": True}
    )
    with pytest.raises(ConfigError, match="label_context needs the task's number of labels"):
        build_strategy(config, tiny_backbone(), (IMAGE, TEXT))
    with pytest.raises(ConfigError, match="label_context must be bool"):
        strategy_config_from_dict({"method": "rag_prompts", "label_context": "yes"})
    rag = strategy(label_context=True)
    with pytest.raises(ValueError, match="needs the training labels"):
        rag.fit_retrieval(
            bank_embeddings(), presence(*[(True, True)] * 6), [f"e{i}" for i in range(6)]
        )
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 3\)"):
        rag.fit_retrieval(
            bank_embeddings(), presence(*[(True, True)] * 6), [f"e{i}" for i in range(6)],
            labels=torch.tensor([0, 1, 2, 3, 0, 1]),
        )  # fmt: skip
    plain, _ = fitted()  # a bank without labels cannot serve a label context
    rag.bank = plain.bank
    with pytest.raises(RuntimeError, match="needs a memory bank with 3 label columns"):
        rag.retrieval_context(bank_embeddings(1), presence((True, True)))


def test_label_bank_is_saved_and_memory_mapped_back(tmp_path: Path) -> None:
    rag, bank = labelled(k=2, bank_dtype="float16")
    queries = {IMAGE: bank[IMAGE][:2] + 0.1, TEXT: bank[TEXT][:2]}
    rows = presence((True, True), (True, False))
    before = rag.retrieval_context(queries, rows, exclude_groups=["g0", "g2"])
    rag.save_files(tmp_path)
    again = strategy(label_context=True, k=2, bank_dtype="float16")
    again.load_files(tmp_path)
    assert again.bank is not None and isinstance(again.bank.arrays["labels"], np.memmap)
    torch.testing.assert_close(
        again.retrieval_context(queries, rows, exclude_groups=["g0", "g2"]), before
    )
