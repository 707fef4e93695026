"""The discrete scheduler: llm / rule / fixed kinds, the cache, the status text, the engine."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from mllm_missing.backbones.testing import tiny_llama_config, tiny_tokenizer
from mllm_missing.errors import ConfigError, DataFormatError
from mllm_missing.inference.engine import InferenceEngine, ModuleChoice
from mllm_missing.scheduler import (
    LLMScheduler,
    Option,
    SchedulerConfig,
    ValidationScores,
    build_prompt,
    build_scheduler,
    get_module_catalog,
    load_validation_scores,
    status_text,
)
from mllm_missing.strategies.fusion import FUSIONS
from mllm_missing.strategies.imputation import IMPUTATIONS
from mllm_missing.types import Modality, Presence, Sample

BOTH, IMAGE_ONLY, TEXT_ONLY = (
    Presence.of("image", "text"),
    Presence.of("image"),
    Presence.of("text"),
)
PATTERNS = (BOTH, IMAGE_ONLY, TEXT_ONLY)
CORPUS = ["zero mean concat gated late attention image text missing present"] * 20


class CountingLM:
    """Wraps a `FrozenCausalLM`, counting `score_options` calls (one per LLM decision)."""

    def __init__(self, lm: Any) -> None:
        self.lm, self.calls = lm, 0

    def score_options(self, messages: Any, options: Any, **kwargs: Any) -> list[float]:
        self.calls += 1
        scores: list[float] = self.lm.score_options(messages, options, **kwargs)
        return scores


@pytest.fixture(scope="module")
def tiny_lm() -> Any:
    """A 2-layer Llama with random weights: what it would generate is gibberish."""
    from transformers import LlamaForCausalLM

    from mllm_missing.backbones.hf import FrozenCausalLM

    tokenizer = tiny_tokenizer(CORPUS)
    torch.manual_seed(0)
    return FrozenCausalLM(LlamaForCausalLM(tiny_llama_config(len(tokenizer))), tokenizer, "tiny")


def scores() -> ValidationScores:
    return ValidationScores(
        "accuracy",
        {
            "zero+concat": {"image+text": 0.90, "image": 0.30, "text": 0.60},
            "mean+gated": {"image+text": 0.85, "image": 0.40, "text": 0.62},
            "zero+late": {"image+text": 0.80, "image": 0.35, "text": 0.70},
        },
    )


OPTIONS = ("zero+concat", "mean+gated", "zero+late")


def test_status_text_for_each_pattern() -> None:
    assert status_text(BOTH) == "Input modality status: image: present; text: present."
    assert status_text(IMAGE_ONLY) == "Input modality status: image: present; text: missing."
    assert status_text(TEXT_ONLY) == "Input modality status: image: missing; text: present."
    assert status_text(Presence.of()) == "Input modality status: image: missing; text: missing."
    three = ("text", "audio", "image")  # listed in MODALITY_ORDER whatever the given order
    assert status_text(Presence.of("audio"), three) == (
        "Input modality status: image: missing; text: missing; audio: present."
    )


def test_catalog_lists_every_module_with_its_description() -> None:
    catalog = get_module_catalog()
    names = {(m.kind, m.name) for m in catalog.modules}
    assert names == {("imputation", n) for n in IMPUTATIONS.names()} | {
        ("fusion", n) for n in FUSIONS.names()
    }
    for module in catalog.modules:  # each has its own one-liner, not the name echoed
        assert module.description != module.name and "\n" not in module.description
    assert "zeros" in catalog.description("imputation", "zero")
    assert "masked" in catalog.describe(Option("knn", "masked_attention"))


def test_llm_always_returns_an_allowed_option(tiny_lm: Any) -> None:
    # Random weights: free generation is not an option name (the model "prefers gibberish").
    messages = build_prompt("answer", TEXT_ONLY, [Option("zero", "concat")], get_module_catalog(),
                            ("image", "text"))  # fmt: skip
    ids = tiny_lm.encode(tiny_lm.chat_text(messages))
    with torch.no_grad():
        out = tiny_lm.model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)
    generated = tiny_lm.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    every = {f"{i}+{f}" for i in IMPUTATIONS.names() for f in FUSIONS.names()}
    assert generated.strip() not in every
    for allowed in (OPTIONS, ("mean+gated",), ("zero+late", "knn+concat+status_text")):
        config = SchedulerConfig(kind="llm", task="answer", options=allowed)
        scheduler = build_scheduler(config, scores=scores(), llm=tiny_lm)
        for presence in PATTERNS:
            decision = scheduler.decide(presence)
            assert decision.option.name in allowed and decision.source == "llm"
            assert set(decision.scores) == set(allowed)
            best = max(decision.scores, key=lambda k: decision.scores[k])
            assert decision.option.name == best  # the argmax of the LLM's log-likelihoods
            assert presence.pattern in decision.rationale and best in decision.rationale


def test_llm_prompt_carries_status_descriptions_and_scores(tiny_lm: Any) -> None:
    catalog = get_module_catalog(scores())
    options = [Option.parse(o) for o in OPTIONS]
    messages = build_prompt("easy-VQA", TEXT_ONLY, options, catalog, ("image", "text"))
    user = messages[-1]["content"]
    assert "Task: easy-VQA" in user
    assert "Input modality status: image: missing; text: present." in user
    assert "- zero+late: imputation zero (fills an absent embedding with zeros" in user
    assert "validation accuracy for this pattern: 0.70" in user


class PriorLM:
    """An LLM that loves one name whatever the prompt, and is swayed a little by evidence: the
    option listed first (the best validated) gains 1.0 when the prompt carries the evidence."""

    def score_options(self, messages: Any, options: Any, **kwargs: Any) -> list[float]:
        evidence = "Input modality status" in messages[-1]["content"]
        prior = {"zero+late": -1.0}
        return [prior.get(o, -5.0) + (1.0 if evidence and i == 0 else 0.0)
                for i, o in enumerate(options)]  # fmt: skip


def test_calibration_removes_the_llms_prior_for_a_name() -> None:
    plain = SchedulerConfig(kind="llm", options=OPTIONS, calibrate=False)
    assert build_scheduler(plain, scores=scores(), llm=PriorLM())(BOTH) == ModuleChoice(
        "zero", "late"
    )  # the prior wins although zero+concat is listed first (best validated)
    calibrated = build_scheduler(SchedulerConfig(kind="llm", options=OPTIONS), scores=scores(),
                                 llm=PriorLM())  # fmt: skip
    decision = calibrated.decide(BOTH)
    assert decision.choice == ModuleChoice("zero", "concat")
    assert decision.scores == {"zero+concat": 1.0, "mean+gated": 0.0, "zero+late": 0.0}
    assert "calibrated log-likelihood" in decision.rationale


def test_decisions_are_cached_per_task_and_pattern(tiny_lm: Any) -> None:
    counting = CountingLM(tiny_lm)
    config = SchedulerConfig(kind="llm", task="easy-VQA", options=OPTIONS)
    scheduler = build_scheduler(config, scores=scores(), llm=counting)
    assert isinstance(scheduler, LLMScheduler)
    inputs = [PATTERNS[i % 3] for i in range(10_000)]
    choices = [scheduler(p) for p in inputs]
    assert scheduler.llm_calls == 3 and counting.calls == 6  # each: prompt + calibration
    assert scheduler.cache_misses == 3 and scheduler.cache_hits == 9_997
    assert all(isinstance(c, ModuleChoice) for c in choices)
    scheduler.decide(TEXT_ONLY, task="another task")  # another task is another key
    assert scheduler.llm_calls == 4 and len(scheduler.decisions()) == 4

    threaded = build_scheduler(config, scores=scores(), llm=CountingLM(tiny_lm))
    workers = [threading.Thread(target=threaded, args=(TEXT_ONLY,)) for _ in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert threaded.llm_calls == 1  # type: ignore[attr-defined]


def test_rule_picks_the_best_validated_option_per_pattern() -> None:
    rule = build_scheduler(SchedulerConfig(kind="rule", options=OPTIONS), scores=scores())
    assert rule(BOTH) == ModuleChoice("zero", "concat")
    assert rule(IMAGE_ONLY) == ModuleChoice("mean", "gated")
    assert rule(TEXT_ONLY) == ModuleChoice("zero", "late")
    assert "+0.0800 over the next" in rule.decide(TEXT_ONLY).rationale
    narrowed = build_scheduler(
        SchedulerConfig(kind="rule", options=("zero+concat", "zero+late")), scores=scores()
    )
    assert narrowed(IMAGE_ONLY) == ModuleChoice("zero", "late")  # only allowed options count
    with pytest.raises(ConfigError, match=r"no validation score for pattern 'text'.*knn\+concat"):
        build_scheduler(SchedulerConfig(kind="rule", options=("knn+concat",)), scores=scores())(
            TEXT_ONLY
        )
    with pytest.raises(ConfigError, match="no validation score"):
        build_scheduler(SchedulerConfig(kind="rule", options=OPTIONS))(BOTH)


def test_fixed_returns_its_option_and_prompt_choices() -> None:
    fixed = build_scheduler(SchedulerConfig(kind="fixed", options=OPTIONS, fixed="zero+late"))
    assert {fixed(p) for p in PATTERNS} == {ModuleChoice("zero", "late")}
    config = SchedulerConfig(
        kind="fixed", imputations=("zero",), fusions=("concat",),
        prompts=("learned", "status_text"), fixed="zero+concat+status_text",
    )  # fmt: skip
    assert [o.name for o in config.allowed_options()] == [
        "zero+concat+learned", "zero+concat+status_text"
    ]  # fmt: skip
    decision = build_scheduler(config).decide(TEXT_ONLY)
    assert decision.prompt == "status_text"
    # The prompt reaches the engine's choice (it was dropped there before).
    assert decision.choice == ModuleChoice("zero", "concat", "status_text")
    assert str(decision.choice) == "zero+concat+status_text"
    assert build_scheduler(config)(TEXT_ONLY).prompt == "status_text"


def test_prompt_only_options_for_a_vlm(tiny_lm: Any) -> None:
    # A VLM has no imputation / fusion modules: its options are the prompts alone.
    assert Option.parse("status_text") == Option(None, None, "status_text")
    assert str(ModuleChoice(None, None, "learned")) == "learned"
    with pytest.raises(ConfigError, match="both an imputation and a fusion or neither"):
        Option("zero", None, "learned")
    with pytest.raises(ConfigError, match="must name a prompt"):
        Option(None, None)
    prompts = ("learned", "status_text")
    fixed = build_scheduler(SchedulerConfig(kind="fixed", options=prompts, fixed="status_text"))
    assert fixed(TEXT_ONLY) == ModuleChoice(None, None, "status_text")
    by_prompt = ValidationScores(
        "accuracy", {"learned": {"text": 0.43}, "status_text": {"text": 0.38}}
    )
    rule = build_scheduler(SchedulerConfig(kind="rule", options=prompts), scores=by_prompt)
    decision = rule.decide(TEXT_ONLY)
    assert decision.choice == ModuleChoice(None, None, "learned")
    assert "best validation accuracy (0.4300, +0.0500 over the next)" in decision.rationale
    flipped = ValidationScores(
        "accuracy", {"learned": {"text": 0.3}, "status_text": {"text": 0.4}}, split="test"
    )
    rule = build_scheduler(SchedulerConfig(kind="rule", options=prompts), scores=flipped)
    assert rule(TEXT_ONLY).prompt == "status_text"
    assert "best test accuracy" in rule.decide(TEXT_ONLY).rationale  # never called validation
    llm = build_scheduler(
        SchedulerConfig(kind="llm", options=prompts), scores=by_prompt, llm=tiny_lm
    )
    chosen = llm.decide(TEXT_ONLY)
    assert chosen.imputation is None and chosen.prompt in prompts
    assert set(chosen.scores) == set(prompts)
    messages = build_prompt("vqa", TEXT_ONLY, [Option.parse(p) for p in prompts],
                            get_module_catalog(by_prompt), ("image", "text"))  # fmt: skip
    user = messages[-1]["content"]
    assert "- learned: prompt: the learned missing-aware prompts; validation accuracy" in user
    assert "imputation" not in user.split("Options:")[1]


def test_engine_refuses_a_prompt_choice_for_a_classifier() -> None:
    pytest.importorskip("open_clip")
    from mllm_missing.strategies.testing import tiny_clip

    model = tiny_model("zero", "concat", tiny_clip())
    config = SchedulerConfig(kind="fixed", imputations=("zero",), fusions=("concat",),
                             prompts=("status_text",), fixed="zero+concat+status_text")  # fmt: skip
    engine = InferenceEngine(model, selector=build_scheduler(config))
    sample = Sample(Presence.of("text"), {Modality.TEXT: "what shape"}, id="q")
    with pytest.raises(ConfigError, match="a classifier has no prompt choice"):
        engine.predict([sample])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kind": "oracle"}, "kind must be one of fixed, llm, rule; got 'oracle'"),
        ({"imputations": ("nope",)}, "imputations must be one of .*zero"),
        ({"fusions": ("sum",)}, "fusions must be one of concat, gated"),
        ({"prompts": ("soft",)}, "prompts must be one of learned, status_text"),
        ({"options": ("zero",)}, "options must look like IMPUTATION"),
        ({"options": ("soft",)}, r"or a prompt alone \(learned, status_text\)"),
        ({"options": ("zero+sum",)}, "options fusion must be one of"),
        ({"kind": "fixed"}, "fixed: the fixed kind needs an option"),
        ({"kind": "fixed", "options": OPTIONS, "fixed": "knn+concat"}, "fixed must be one of"),
        ({"task": " "}, "task must be a non-empty"),
        ({"modalities": ("smell",)}, "modalities must be one of image, text, audio"),
        ({"reduction": "max"}, "reduction must be one of mean, sum"),
        ({"calibrate": "yes"}, "calibrate must be true or false"),
        ({"kind": "llm", "llm": ""}, "llm must name a preset"),
    ],
)
def test_bad_configs_fail_naming_the_field(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SchedulerConfig(**changes)


def test_validation_scores_file_round_trip(tmp_path: Any) -> None:
    path = tmp_path / "scores.json"
    path.write_text(__import__("json").dumps(scores().to_dict()))
    assert load_validation_scores(path) == scores()
    path.write_text('{"scores": {"zero+concat": [1]}}')
    with pytest.raises(DataFormatError, match="expected"):
        load_validation_scores(path)


def tiny_model(imputation: str, fusion: str, backbone: Any) -> Any:
    """A tiny CLIP model for 3 labels (as in tests/inference/test_engine.py)."""
    from mllm_missing.model import build_model

    spec = {
        "backbone": "clip-vit-b-16", "strategy": {"method": "none"}, "imputation": imputation,
        "fusion": fusion, "hidden_size": 16, "routed_head": False, "task": "shapes",
        "task_type": "multiclass", "num_labels": 3, "label_names": ["a", "b", "c"],
        "modalities": ["image", "text"],
    }  # fmt: skip
    torch.manual_seed(len(imputation) + len(fusion))
    dims = {m: backbone.embed_dim(m) for m in (Modality.IMAGE, Modality.TEXT)}
    model = build_model(spec, backbone, dims).eval()
    if imputation == "mean":  # a zero mean stands in for a fitted one
        model.classifier.imputation.fitted.fill_(True)
    return model


def test_schedulers_are_the_engines_selector(tiny_lm: Any) -> None:
    pytest.importorskip("open_clip")
    import numpy as np
    from PIL import Image

    from mllm_missing.strategies.testing import tiny_clip

    backbone = tiny_clip()
    models = {Option.parse(o).name: tiny_model(*o.split("+"), backbone) for o in OPTIONS}
    main = models["zero+concat"]
    candidates = {ModuleChoice(*k.split("+")): m for k, m in models.items() if m is not main}
    rng = np.random.default_rng(0)
    samples = []
    for i in range(9):
        payloads: dict[Modality, Any] = {}
        if i % 3 != 2:
            payloads[Modality.IMAGE] = Image.fromarray(rng.integers(0, 256, (32, 32, 3), "uint8"))
        if i % 3 != 1:
            payloads[Modality.TEXT] = f"question {i}"
        samples.append(Sample(Presence(frozenset(payloads)), payloads, id=f"r{i}"))
    rule = build_scheduler(SchedulerConfig(kind="rule", options=OPTIONS), scores=scores())
    engine = InferenceEngine(main, selector=rule, candidates=candidates, batch_size=4)
    predictions = engine.predict(samples)
    want = {"image+text": "zero+concat", "image": "mean+gated", "text": "zero+late"}
    for prediction in predictions:
        assert str(prediction.choice) == want[prediction.presence.pattern]
    alone = InferenceEngine(models["zero+late"]).predict([samples[2]])[0]
    torch.testing.assert_close(predictions[2].logits, alone.logits)  # the chosen model ran

    counting = CountingLM(tiny_lm)
    config = SchedulerConfig(kind="llm", task="shapes", options=OPTIONS)
    llm = build_scheduler(config, scores=scores(), llm=counting)
    engine = InferenceEngine(main, selector=llm, candidates=candidates, batch_size=4)
    engine.predict(samples)
    engine.predict(samples)
    assert llm.llm_calls == 3 and engine.selector_calls == 3  # type: ignore[attr-defined]
