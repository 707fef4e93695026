"""The easy-VQA projector VLM recipe: missing-aware tokens, answer scoring, training, config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mllm_missing.backbones.hf import FrozenCausalLM
from mllm_missing.backbones.missing_aware_vlm import MissingAwareVLM
from mllm_missing.backbones.projector_vlm import ProjectorVLM
from mllm_missing.backbones.testing import tiny_llama_config, tiny_tokenizer
from mllm_missing.config import load_config
from mllm_missing.errors import ConfigError
from mllm_missing.training.trainer import LoopConfig, fit
from mllm_missing.training.vlm import VLMTask, VLMTrainConfig, _Questions, accuracy

RECIPE = (
    Path(__file__).resolve().parents[2]
    / "recipes" / "configs" / "easy_vqa" / "smollm2-efficientnet_projector.yaml"
)  # fmt: skip
OPTIONS = ["red", "green", "blue", "circle", "rectangle"]
CORPUS = [
    "what colour is the shape",
    "what shape is it",
    *OPTIONS,
    "red circle blue rectangle",
] * 20
DIM = 16


def tiny_lm(seed: int = 0) -> FrozenCausalLM:
    from transformers import LlamaForCausalLM

    tokenizer = tiny_tokenizer(CORPUS)
    torch.manual_seed(seed)
    return FrozenCausalLM(
        LlamaForCausalLM(tiny_llama_config(len(tokenizer), initializer_range=0.2)),
        tokenizer,
        name="tiny-llama",
    )


def make_model(seed: int = 0) -> MissingAwareVLM:
    lm = tiny_lm(seed)
    torch.manual_seed(seed + 1)
    return MissingAwareVLM(ProjectorVLM(lm, image_dim=DIM, num_image_tokens=3))


def questions(n: int, present: bool = True) -> _Questions:
    generator = torch.Generator().manual_seed(5)
    labels = torch.randint(len(OPTIONS), (n,), generator=generator)
    return _Questions(
        questions=["what colour is the shape" if i % 2 else "what shape is it" for i in range(n)],
        answers=[OPTIONS[i] for i in labels.tolist()],
        labels=labels,
        features=torch.randn(n, DIM, generator=generator),
        present=torch.full((n,), present, dtype=torch.bool),
    )


def brute_force_scores(
    model: MissingAwareVLM, question: str, feature: torch.Tensor | None, missing: bool = True
) -> list[float]:
    """Sum of answer-token log-probs, one full teacher-forced pass per option."""
    vlm = model.vlm
    tokens = model.image_tokens([feature], use_missing_tokens=missing)
    scores = []
    for option in OPTIONS:
        embeds, mask, labels = vlm.build_inputs([model.chat(question)], tokens, [option])
        assert labels is not None
        logits = vlm.lm(inputs_embeds=embeds, attention_mask=mask)[0, :-1].log_softmax(-1)
        targets = labels[0, 1:]
        keep = targets != -100
        scores.append(float(logits[keep].gather(-1, targets[keep][:, None]).sum()))
    return scores


def test_scores_equal_full_passes_and_score_options() -> None:
    model = make_model().eval()
    data = questions(3)
    features = [data.features[0], None, data.features[2]]
    with torch.no_grad():
        got = model.score_answers(data.questions, OPTIONS, image_features=features)
        for row, feature in enumerate(features):
            expected = brute_force_scores(model, data.questions[row], feature)
            assert torch.allclose(got[row], torch.tensor(expected), atol=1e-4), row
        # Without missing tokens an absent image is the plain text-only chat: the LM's own scorer.
        text_only = model.score_answers(
            data.questions[:1], OPTIONS, image_features=[None], use_missing_tokens=False
        )
        reference = model.vlm.lm.score_options(model.chat(data.questions[0]), OPTIONS)
    assert torch.allclose(text_only[0], torch.tensor(reference), atol=1e-4)


def test_loss_is_the_forward_loss_on_answer_tokens() -> None:
    model = make_model()
    data = questions(4)
    rows = torch.arange(4)
    chats = [model.chat(q) for q in data.questions]
    expected = model.vlm(chats, image_features=data.features, answers=data.answers).loss
    got = model.loss(data.questions, data.answers, image_features=data.features_of(rows))
    assert expected is not None and torch.allclose(got, expected, atol=1e-5)


def test_absent_image_uses_the_missing_tokens() -> None:
    model = make_model().eval()
    data = questions(2)
    present = model.score_answers(data.questions, OPTIONS, image_features=data.features)
    absent = model.score_answers(data.questions, OPTIONS, image_features=[None, None])
    text_only = model.score_answers(
        data.questions, OPTIONS, image_features=[None, None], use_missing_tokens=False
    )
    assert not torch.allclose(present, absent) and not torch.allclose(absent, text_only)
    with torch.no_grad():
        model.missing_tokens.tokens.add_(1.0)
    moved = model.score_answers(data.questions, OPTIONS, image_features=[None, None])
    same = model.score_answers(data.questions, OPTIONS, image_features=data.features)
    assert not torch.allclose(moved, absent) and torch.equal(same, present)


def test_status_text_replaces_the_missing_tokens_for_an_absent_image() -> None:
    from mllm_missing.errors import ConfigError
    from mllm_missing.training.vlm import STATUS_LINE

    model = make_model().eval()
    seen: list[tuple[str, list[Any]]] = []
    build = model.vlm.build_inputs

    def spy(prompts: Any, tokens: Any) -> Any:
        seen.append((str(prompts[0]), list(tokens)))
        return build(prompts, tokens)

    model.vlm.build_inputs = spy  # type: ignore[method-assign]
    model.generate("what shape is it", None, max_new_tokens=2)
    model.generate("what shape is it", None, max_new_tokens=2, missing_prompt="status_text")
    (learned_prompt, learned_tokens), (told_prompt, told_tokens) = seen
    assert learned_tokens[0] is not None and STATUS_LINE not in learned_prompt
    assert told_tokens == [None] and repr(f"{STATUS_LINE}\nwhat shape is it") in told_prompt
    with pytest.raises(ConfigError, match="missing_prompt must be one of"):
        model.generate("what shape is it", None, missing_prompt="tokens")


def test_one_step_trains_only_projector_and_missing_tokens(tmp_path: Path) -> None:
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train = questions(8)
    train.present = torch.tensor([True, False] * 4)  # image dropout: both kinds in the batch
    task = VLMTask(model, train, questions(4), OPTIONS, VLMTrainConfig(train_size=8))
    loop = LoopConfig(epochs=1, batch_size=8, lr=1e-2, seed=0, output_dir=str(tmp_path / "run"))
    result = fit(task, loop)
    assert result.steps == 1
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable
    assert trainable == {
        "missing_tokens.tokens",
        *(f"vlm.projector.{n}" for n, _ in model.vlm.projector.named_parameters()),
    }
    assert (tmp_path / "run" / "checkpoints" / "last" / "trainable.safetensors").is_file()
    saved = json.loads((tmp_path / "run" / "best" / "recipe_config.json").read_text())
    assert saved["train_size"] == 8
    assert 0.0 <= result.best_metric <= 1.0  # type: ignore[operator]


def test_save_and_load_give_identical_scores(tmp_path: Path) -> None:
    model = make_model()
    with torch.no_grad():
        model.missing_tokens.tokens.normal_()
        for p in model.vlm.projector.parameters():
            p.add_(0.1)
    data = questions(4)
    data.present = torch.tensor([True, False, True, False])
    model.save_pretrained(tmp_path / "saved")
    fresh = make_model(seed=7)  # same LM weights (seed only moves the projector and tokens)
    fresh = MissingAwareVLM.from_pretrained(tmp_path / "saved", make_model().vlm)
    rows = torch.arange(4)
    expected = model.eval().score_answers(
        data.questions, OPTIONS, image_features=data.features_of(rows)
    )
    got = fresh.eval().score_answers(data.questions, OPTIONS, image_features=data.features_of(rows))
    assert torch.equal(expected, got)
    assert accuracy(model, data, OPTIONS, 2) == accuracy(fresh, data, OPTIONS, 3)
    saved = json.loads((tmp_path / "saved" / "missing_tokens.json").read_text())
    assert saved["num_tokens"] == 3


def test_recipe_config_parses() -> None:
    config = load_config(VLMTrainConfig, RECIPE)
    assert config.output_dir.endswith(RECIPE.stem)
    assert config.threads == 1 and set(config.conditions) == {
        "present",
        "absent",
        "absent_status",
        "untrained_present",
        "text_only",
    }


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["image_dropout=1.5"], "image_dropout"),
        (["batch_size=0"], "batch_size"),
        (["conditions=[present,sideways]"], "conditions"),
        (["lr=-1"], "lr"),
        (["train_size=lots"], "train_size"),
        (["learning_rate=0.1"], "learning_rate"),
    ],
)
def test_config_errors_name_the_field(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        load_config(VLMTrainConfig, RECIPE, overrides)


@pytest.mark.slow
def test_recipe_runs_on_the_real_models(tmp_path: Path) -> None:
    from mllm_missing.training.vlm import run_vlm_training

    config = VLMTrainConfig(
        train_size=8, val_size=4, choice_val_size=4, test_size=4, batch_size=4,
        eval_batch_size=4, checkpoint_every=1, conditions=("present", "absent", "text_only"),
        output_dir=str(tmp_path / "run"),
    )  # fmt: skip
    results = run_vlm_training(config)
    assert results["training"]["steps"] == 2
    assert set(results["test"]) == {"present", "absent", "text_only"}
    assert set(results["val"]) == {"absent"} and results["val"]["absent"]["questions"] == 4
    assert json.loads((tmp_path / "run" / "results.json").read_text())["config"]["train_size"] == 8
    assert (tmp_path / "run" / "best" / "projector" / "projector_model.safetensors").is_file()
    # The checkpoint loads onto the offline VLM for chat, with and without an image.
    from mllm_missing.data.easy_vqa import load_easy_vqa
    from mllm_missing.training.vlm import load_trained_vlm

    model = load_trained_vlm(tmp_path / "run" / "best")
    assert model.vlm.image_encoder.image_size == config.image_size
    image = load_easy_vqa(split="test", limit=1)[0]["image"]
    for answer in (model.generate("What color is the shape?", image, max_new_tokens=4),
                   model.generate("What color is the shape?", None, max_new_tokens=4)):  # fmt: skip
        assert isinstance(answer, str)


def test_interrupted_training_resumes_to_the_same_parameters(tmp_path: Path) -> None:
    def run(output: Path, stop: int | None) -> dict[str, torch.Tensor]:
        model = make_model()
        train = questions(8)
        train.present = torch.tensor([True, False] * 4)
        task = VLMTask(model, train, questions(2), OPTIONS)
        loop = LoopConfig(epochs=1, batch_size=2, lr=1e-2, seed=3, output_dir=str(output))
        fit(task, loop, stop_after_steps=stop)
        if stop is not None:  # a fresh process: new model, resumed from the checkpoint
            model = make_model()
            task = VLMTask(model, train, questions(2), OPTIONS)
            fit(task, loop, resume=True)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    whole = run(tmp_path / "whole", None)
    resumed = run(tmp_path / "resumed", 2)
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[n], resumed[n]) for n in whole)


# --- the recipe's run, on tiny models and synthetic questions -----------------------------------


def fake_rows(rows: list[int]) -> _Questions:
    """Synthetic easy-VQA questions for train-split `rows` (the same rows, the same questions)."""
    from mllm_missing.data.easy_vqa import ANSWERS

    labels = torch.tensor([r % len(ANSWERS) for r in rows])
    features = torch.stack([torch.randn(DIM, generator=torch.Generator().manual_seed(r))
                            for r in rows])  # fmt: skip
    return _Questions(
        questions=["what colour is the shape" if r % 2 else "what shape is it" for r in rows],
        answers=[ANSWERS[i] for i in labels.tolist()],
        labels=labels,
        features=features,
        present=torch.ones(len(rows), dtype=torch.bool),
    )


@pytest.fixture
def tiny_recipe(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[list[int]]]:
    """`run_vlm_training` on the tiny LM, a fake encoder and 60 synthetic questions per split;
    returns the rows each split was loaded with."""
    from types import SimpleNamespace

    loaded: dict[str, list[list[int]]] = {"train": [], "test": []}

    def load(config: Any, dataset: Any, split: str, rows: list[int], encoder: Any) -> _Questions:
        loaded[split].append(list(rows))
        return fake_rows(rows)

    monkeypatch.setattr("mllm_missing.training.vlm._load", load)
    monkeypatch.setattr("mllm_missing.backbones.hf.load_smollm2", lambda **kw: tiny_lm())
    monkeypatch.setattr(
        "mllm_missing.backbones.offline.load_default_image_encoder",
        lambda **kw: SimpleNamespace(dim=DIM, name="fake"),
    )
    monkeypatch.setattr("mllm_missing.data.easy_vqa.load_easy_vqa", lambda **kw: range(60))
    return loaded


def test_recipe_scores_the_absent_options_on_validation_and_resume_adds_them(
    tmp_path: Path, tiny_recipe: dict[str, list[list[int]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    from mllm_missing.chat.vlm import build_vlm_scheduler, find_vlm
    from mllm_missing.data.easy_vqa import ANSWERS
    from mllm_missing.training.vlm import STATUS_LINE, run_vlm_training, subset_rows
    from mllm_missing.types import Presence

    output = tmp_path / "run"
    config = VLMTrainConfig(
        num_image_tokens=3, train_size=8, val_size=4, choice_val_size=0, test_size=4, batch_size=4,
        eval_batch_size=4,
        checkpoint_every=0, conditions=("present", "absent", "absent_status"),
        output_dir=str(output),
    )  # fmt: skip
    first = run_vlm_training(config)  # a run that scored no validation questions
    assert first["training"]["steps"] == 2 and first["val"] == {}
    assert set(first["test"]) == {"present", "absent", "absent_status"}
    # As written before the recipe had choice_val_size: no such field, no "val".
    written = json.loads((output / "results.json").read_text())
    del written["config"]["choice_val_size"], written["val"]
    (output / "results.json").write_text(json.dumps(written))

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a finished run was trained or scored again")

    monkeypatch.setattr(VLMTask, "loss", forbidden)
    tiny_recipe["train"].clear()
    scored: list[tuple[str, list[str], bool, bool]] = []

    def spy(model: Any, data: _Questions, *args: Any, **kwargs: Any) -> float:
        scored.append((kwargs["desc"], data.questions, bool(data.present.any()),
                       kwargs["use_missing_tokens"]))  # fmt: skip
        return accuracy(model, data, *args, **kwargs)

    monkeypatch.setattr("mllm_missing.training.vlm.accuracy", spy)
    resumed = run_vlm_training(replace(config, choice_val_size=6, checkpoint_every=1), resume=True)
    assert resumed["test"] == first["test"]  # kept, not scored again
    assert resumed["training"] == first["training"] and resumed["sizes"]["choice_val"] == 6
    assert set(resumed["val"]) == {"absent", "absent_status"}
    # Validation rows: train-split rows used neither for training nor for the epoch check.
    train_rows, epoch_rows, choice_rows = tiny_recipe["train"]
    assert choice_rows == subset_rows(60, 6, 0, skip=12)
    assert not set(choice_rows) & (set(train_rows) | set(epoch_rows))
    # Only the validation scores were computed: image absent, missing tokens / status line.
    questions = fake_rows(choice_rows).questions
    assert scored == [
        ("val absent", questions, False, True),
        ("val absent_status", [f"{STATUS_LINE}\n{q}" for q in questions], False, False),
    ]
    # The scores are those of the trained checkpoint.
    model = MissingAwareVLM.from_pretrained(output / "best", make_model().vlm)
    data = fake_rows(choice_rows)
    options = list(ANSWERS)
    expected = {
        "absent": accuracy(model, data.without_images(), options, 4),
        "absent_status": accuracy(
            model, data.without_images(STATUS_LINE), options, 4, use_missing_tokens=False
        ),
    }
    for condition, value in expected.items():
        row = resumed["val"][condition]
        assert row["accuracy"] == value and row["questions"] == 6
        assert row["correct"] == round(value * 6)
    assert json.loads((output / "results.json").read_text())["val"] == resumed["val"]
    # Resuming again scores nothing; the chat's rule scheduler reads the validation scores.
    monkeypatch.setattr("mllm_missing.training.vlm.accuracy", forbidden)
    again = run_vlm_training(replace(config, choice_val_size=6), resume=True)
    assert again["val"] == resumed["val"]
    _, lines = build_vlm_scheduler("rule", find_vlm(output))
    assert f"[val] accuracy: learned {expected['absent']:.3f}" in lines[1]
    assert "(6 questions)" in lines[1] and "not an evaluation" not in lines[1]
    scheduler, _ = build_vlm_scheduler("rule", find_vlm(output))
    assert "validation accuracy" in scheduler.decide(Presence.of("text")).rationale


def test_choice_val_size_zero_or_more(tmp_path: Path) -> None:
    assert VLMTrainConfig(choice_val_size=0).choice_val_size == 0
    with pytest.raises(ConfigError, match="choice_val_size"):
        VLMTrainConfig(choice_val_size=-1)
