"""Chat with the missing-aware VLM: the scheduler's prompt choice reaches the LM's input (read
back from the input embeddings), the turn reports it, tokens stream, and `chat --vlm` checks its
arguments before loading anything."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from mllm_missing.backbones.hf import FrozenCausalLM
from mllm_missing.backbones.missing_aware_vlm import MissingAwareVLM
from mllm_missing.backbones.projector_vlm import ProjectorVLM
from mllm_missing.backbones.testing import tiny_llama_config, tiny_tokenizer
from mllm_missing.chat import ChatSession, ClassifierAnswerer, VLMAnswerer
from mllm_missing.inference.engine import ModuleChoice
from mllm_missing.scheduler import (
    PROMPT_CHOICES,
    SchedulerConfig,
    ValidationScores,
    build_scheduler,
)
from mllm_missing.types import Presence, status_text

STATUS = status_text(Presence.of("text"))
QUESTION = "what shape is it"
CORPUS = [QUESTION, "what colour is the shape", "red green blue circle rectangle", STATUS] * 20
TOKENS = 3  # image / missing tokens per image


class FakeEncoder(nn.Module):
    """A frozen random map of a PIL image's mean colour to 8 features."""

    def __init__(self) -> None:
        super().__init__()
        self.map = nn.Linear(3, 8)
        self.map.requires_grad_(False)
        self.dim, self.name = 8, "fake"

    @torch.inference_mode()
    def encode(self, images: Sequence[Any]) -> torch.Tensor:
        means = [np.asarray(i.convert("RGB"), dtype=np.float32).mean((0, 1)) / 255 for i in images]
        out: torch.Tensor = self.map(torch.from_numpy(np.stack(means)))
        return out


def tiny_vlm(seed: int = 0) -> MissingAwareVLM:
    from transformers import LlamaForCausalLM

    tokenizer = tiny_tokenizer(CORPUS)
    torch.manual_seed(seed)
    config = tiny_llama_config(len(tokenizer), initializer_range=0.2)
    lm = FrozenCausalLM(LlamaForCausalLM(config), tokenizer, name="tiny-llama")
    return MissingAwareVLM(ProjectorVLM(lm, FakeEncoder(), num_image_tokens=TOKENS)).eval()


class LMInputs:
    """Records the `inputs_embeds` each `generate` call hands the LM and reads them back as text:
    token embeddings become their tokens, the missing tokens ``<missing>``, anything else (the
    projected image) ``<image>``."""

    def __init__(self, vlm: MissingAwareVLM) -> None:
        self.vlm, self.seen = vlm, []
        model = vlm.vlm.lm.model
        original = model.generate

        def spy(*args: Any, **kwargs: Any) -> Any:
            self.seen.append(kwargs["inputs_embeds"][0].detach().clone())
            return original(*args, **kwargs)

        model.generate = spy

    def text(self, index: int = -1) -> str:
        lm = self.vlm.vlm.lm
        table = lm.model.get_input_embeddings().weight.detach()
        missing = self.vlm.missing_tokens().detach()
        pieces: list[str] = []
        ids: list[int] = []
        for row in self.seen[index]:
            match = (table == row).all(-1).nonzero().flatten().tolist()
            if match:
                ids.append(match[0])
                continue
            pieces.append(lm.tokenizer.decode(ids))
            ids = []
            pieces.append("<missing>" if (missing == row).all(-1).any() else "<image>")
        return "".join(pieces) + lm.tokenizer.decode(ids)


def prompt_scheduler(kind: str, **kwargs: Any) -> Any:
    scores = kwargs.pop("scores", None)
    llm = kwargs.pop("llm", None)
    config = SchedulerConfig(kind=kind, task="easy-VQA", options=PROMPT_CHOICES, **kwargs)
    return build_scheduler(config, scores=scores, llm=llm)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / "red.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(path)
    return path


@pytest.mark.parametrize("prompt", ["learned", "status_text"])
def test_fixed_prompt_choice_is_what_the_lm_reads(prompt: str, image: Path) -> None:
    vlm = tiny_vlm()
    inputs = LMInputs(vlm)
    session = ChatSession(
        VLMAnswerer(vlm, max_new_tokens=4), prompt_scheduler("fixed", fixed=prompt)
    )
    seen = session.ask(QUESTION, image=image)
    with_image = inputs.text()
    assert seen.ok and seen.prompt is None and seen.modules is None  # nothing to choose
    assert with_image.count("<image>") == TOKENS and "<missing>" not in with_image
    assert STATUS not in with_image and QUESTION in with_image
    blind = session.ask(QUESTION)
    lm_read = inputs.text()
    assert blind.ok and blind.prompt == prompt and blind.missing == ["image"]
    assert blind.status_line() == f"used: text; missing: image; prompt: {prompt} (scheduler: fixed)"
    assert "<image>" not in lm_read
    if prompt == "status_text":
        assert f"{STATUS}\n{QUESTION}" in lm_read and "<missing>" not in lm_read
        assert f'the image was missing: the LM was told so in text ("{STATUS}")' in blind.notes
    else:
        assert lm_read.count("<missing>") == TOKENS and STATUS not in lm_read
        assert "the image was missing: the learned missing-aware prompt stood in" in blind.notes
    # The answer is the model's own generate with that prompt.
    assert blind.answer == vlm.generate(QUESTION, None, max_new_tokens=4, missing_prompt=prompt)


def test_rule_scheduler_follows_the_scores_and_says_why() -> None:
    for better, worse in (("status_text", "learned"), ("learned", "status_text")):
        vlm = tiny_vlm()
        inputs = LMInputs(vlm)
        scores = ValidationScores(
            "accuracy", {better: {"text": 0.5}, worse: {"text": 0.4}}, split="test"
        )
        session = ChatSession(VLMAnswerer(vlm), prompt_scheduler("rule", scores=scores))
        turn = session.ask(QUESTION)
        assert turn.prompt == better and turn.scheduler == "rule"
        assert turn.rationale == (
            f"text: {better} has the best test accuracy (0.5000, +0.1000 over the next)"
        )
        assert f"why: {turn.rationale}" in turn.render()
        assert (STATUS in inputs.text()) == (better == "status_text")


class EvidenceLM:
    """An LLM scorer that likes `favourite` when the prompt carries the evidence (task, status,
    scores) and is indifferent to the bare option list (the calibration pass)."""

    def __init__(self, favourite: str) -> None:
        self.favourite, self.prompts = favourite, []

    def score_options(self, messages: Any, options: Any, **kwargs: Any) -> list[float]:
        user = messages[-1]["content"]
        self.prompts.append(user)
        if "Task:" not in user:
            return [-1.0 for _ in options]
        return [-0.5 if o == self.favourite else -2.0 for o in options]


def test_llm_scheduler_choice_reaches_the_lm_and_is_asked_once_per_pattern(image: Path) -> None:
    vlm = tiny_vlm()
    inputs = LMInputs(vlm)
    scorer = EvidenceLM("status_text")
    session = ChatSession(VLMAnswerer(vlm), prompt_scheduler("llm", llm=scorer))
    first = session.ask(QUESTION)
    assert first.prompt == "status_text" and first.scheduler == "llm"
    assert "the LLM ranks status_text first" in str(first.rationale)
    assert f"{STATUS}\n{QUESTION}" in inputs.text()
    # The LLM read the status line and the prompt options, not imputation / fusion modules.
    assert STATUS in scorer.prompts[0] and "- learned: prompt:" in scorer.prompts[0]
    session.ask("what colour is the shape")
    session.ask(QUESTION, image=image)  # image present: the scheduler is not asked
    assert len(scorer.prompts) == 2  # one decision (evidence + calibration pass), cached
    assert session.scheduler.decisions().keys() == {("easy-VQA", "text")}


def test_answer_tokens_stream_as_they_are_generated() -> None:
    vlm = tiny_vlm()
    session = ChatSession(VLMAnswerer(vlm, max_new_tokens=8))
    pieces: list[str] = []
    turn = session.ask(QUESTION, stream=pieces.append)
    assert "".join(pieces) == turn.render()
    answer_pieces = pieces[:-1]  # the last piece is the status and detail lines
    assert "".join(answer_pieces) == turn.answer
    tokens = vlm.vlm.lm.encode(turn.answer)
    assert len(tokens) >= 3  # random weights, seed 0: a multi-token answer
    assert len(answer_pieces) >= 2  # not the whole answer at the end


def test_a_module_choice_for_the_vlm_and_a_prompt_for_a_classifier_are_refused(
    tiny_model: Any,
) -> None:
    modules = build_scheduler(
        SchedulerConfig(kind="fixed", options=("zero+concat",), fixed="zero+concat")
    )
    turn = ChatSession(VLMAnswerer(tiny_vlm()), modules).ask(QUESTION)
    assert not turn.ok and "this VLM takes a prompt choice (learned, status_text)" in str(
        turn.error
    )
    told = build_scheduler(
        SchedulerConfig(kind="fixed", imputations=("zero",), fusions=("concat",),
                        prompts=("status_text",), fixed="zero+concat+status_text")
    )  # fmt: skip
    turn = ChatSession(ClassifierAnswerer(tiny_model), told).ask(QUESTION)
    assert not turn.ok and "a classifier has no prompt choice" in str(turn.error)
    assert ModuleChoice("zero", "concat", "status_text") == told(Presence.of("text"))


# --- the command line ---------------------------------------------------------------------------


def fake_checkpoint(root: Path, test: dict[str, Any] | None = None, split: str = "test") -> Path:
    """A recipe output_dir as `recipes/easy_vqa_vlm.py` lays it out (weights not needed: the
    tests that get past the argument checks load a tiny VLM instead)."""
    (root / "best" / "projector").mkdir(parents=True)
    (root / "best" / "missing_tokens.json").write_text("{}")
    if test is not None:
        results = {"metric": "accuracy", split: {k: {"accuracy": v} for k, v in test.items()}}
        (root / "results.json").write_text(json.dumps(results))
    return root


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--vlm", "{missing}"], "no such folder"),
        (["--vlm", "{empty}"], "not a projector VLM checkpoint (no missing_tokens.json"),
        (["--vlm", "{classifier}"], "it looks like a classifier checkpoint: use --checkpoint"),
        (["--vlm", "{ck}", "--prompt", "status_text", "--scheduler", "rule"],
         "--prompt sets the fixed scheduler's choice; --scheduler rule chooses"),
        (["--vlm", "{ck}", "--prompt", "learned", "--scheduler", "llm"], "--scheduler llm"),
        (["--vlm", "{unscored}", "--scheduler", "rule"],
         "--scheduler rule needs a score per prompt and has none"),
        (["--checkpoint", "{ck}", "--scheduler", "llm"], "--scheduler applies to --vlm only"),
        (["--checkpoint", "{ck}", "--prompt", "learned"], "--prompt applies to --vlm only"),
        (["--vlm", "{ck}", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    ],
)  # fmt: skip
def test_chat_vlm_argument_errors_are_clear(
    args: list[str], message: str, tmp_path: Path, capsys: Any, monkeypatch: Any
) -> None:
    from mllm_missing.cli import main

    def no_loading(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr("mllm_missing.training.vlm.load_trained_vlm", no_loading)
    (tmp_path / "empty").mkdir()
    (tmp_path / "classifier" / "best").mkdir(parents=True)
    (tmp_path / "classifier" / "best" / "model_config.json").write_text("{}")
    paths = {
        "missing": tmp_path / "nope",
        "empty": tmp_path / "empty",
        "classifier": tmp_path / "classifier",
        "ck": fake_checkpoint(tmp_path / "ck", {"absent": 0.43}),
        "unscored": fake_checkpoint(tmp_path / "unscored", {"present": 0.75}),
    }
    argv = ["chat", *(a.format(**paths) for a in args)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_vlm_and_checkpoint_are_exclusive_and_one_is_needed(capsys: Any) -> None:
    from mllm_missing.cli import main

    for argv in (["chat"], ["chat", "--vlm", "a", "--checkpoint", "b"]):
        with pytest.raises(SystemExit):
            main(argv)
    assert "not allowed with argument" in capsys.readouterr().err


def test_rule_reads_the_recipe_results_and_says_they_are_test_scores(tmp_path: Path) -> None:
    from mllm_missing.chat.vlm import build_vlm_scheduler, find_vlm

    both = find_vlm(fake_checkpoint(tmp_path / "a", {"absent": 0.433, "absent_status": 0.5}))
    assert both.directory == tmp_path / "a" / "best" and both.results == tmp_path / "a/results.json"
    assert find_vlm(tmp_path / "a" / "best") == both  # best/ itself finds its results too
    scheduler, lines = build_vlm_scheduler("rule", both)
    assert scheduler.decide(Presence.of("text")).prompt == "status_text"
    assert "[test] accuracy: learned 0.433, status_text 0.500" in lines[1]
    assert "not an evaluation" in lines[1]
    only = find_vlm(fake_checkpoint(tmp_path / "b", {"present": 0.7, "absent": 0.433}))
    scheduler, lines = build_vlm_scheduler("rule", only)
    decision = scheduler.decide(Presence.of("text"))
    assert decision.prompt == "learned" and "unscored: status_text" in decision.rationale
    assert "not scored there: status_text" in lines[1]
    val = find_vlm(fake_checkpoint(tmp_path / "c", {"absent": 0.3, "absent_status": 0.2}, "val"))
    scheduler, lines = build_vlm_scheduler("rule", val)
    assert "best validation accuracy" in scheduler.decide(Presence.of("text")).rationale
    assert "not an evaluation" not in lines[1]
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"scores": {"status_text": {"text": 0.9}}}))
    scheduler, lines = build_vlm_scheduler("rule", only, scores_file=str(scores))
    assert scheduler.decide(Presence.of("text")).prompt == "status_text"


def test_rule_prefers_the_validation_scores_over_the_test_scores(tmp_path: Path) -> None:
    from mllm_missing.chat.vlm import build_vlm_scheduler, find_vlm

    root = fake_checkpoint(tmp_path / "run")

    def row(accuracy: float) -> dict[str, Any]:
        return {"accuracy": accuracy, "questions": 1000}

    results = {  # as the recipe writes them: test and validation disagree on the better prompt
        "metric": "accuracy",
        "test": {"present": row(0.75), "absent": row(0.40), "absent_status": row(0.45)},
        "val": {"absent": row(0.44), "absent_status": row(0.38)},
    }
    (root / "results.json").write_text(json.dumps(results))
    for kind in ("rule", "llm"):
        scheduler, lines = build_vlm_scheduler(kind, find_vlm(root), llm=EvidenceLM("learned"))
        assert "[val] accuracy: learned 0.440, status_text 0.380 (1000 questions)" in lines[1]
        assert "test" not in lines[1].replace(str(tmp_path), "")
        decision = scheduler.decide(Presence.of("text"))
        assert decision.prompt == "learned"
        assert "validation accuracy" in decision.rationale and "test" not in decision.rationale
    only_one = {**results, "val": {"absent_status": row(0.38)}}
    (root / "results.json").write_text(json.dumps(only_one))
    scheduler, lines = build_vlm_scheduler("rule", find_vlm(root))
    # One validation score is still validation: never mixed with the other's test score.
    assert "[val]" in lines[1] and "not scored there: learned" in lines[1]
    assert scheduler.decide(Presence.of("text")).prompt == "status_text"


@pytest.mark.parametrize(
    ("extra", "kind", "expected"),
    [
        ([], "fixed", "learned"),
        (["--prompt", "status_text"], "fixed", "status_text"),
        (["--scheduler", "rule"], "rule", "status_text"),  # 0.500 over 0.433
        (["--scheduler", "llm"], "llm", None),  # the tiny LM's pick
    ],
)
def test_chat_vlm_in_the_terminal(
    extra: list[str],
    kind: str,
    expected: str | None,
    tmp_path: Path,
    image: Path,
    monkeypatch: Any,
    capsys: Any,
) -> None:
    import re

    from mllm_missing.cli import main

    vlm = tiny_vlm()
    inputs = LMInputs(vlm)
    loaded: list[Path] = []

    def load(directory: Path, **kwargs: Any) -> MissingAwareVLM:
        loaded.append(Path(directory))
        return vlm

    monkeypatch.setattr("mllm_missing.training.vlm.load_trained_vlm", load)
    root = fake_checkpoint(tmp_path / "run", {"absent": 0.433, "absent_status": 0.5})
    monkeypatch.setattr("sys.stdin", io.StringIO(f"/image {image}\n{QUESTION}\n{QUESTION}\n"))
    assert main(["chat", "--vlm", str(root), "--max-new-tokens", "3", *extra]) == 0
    out = capsys.readouterr().out
    assert loaded == [root / "best"]
    assert f"mllm-missing chat with the projector VLM {root / 'best'} (image + text)" in out
    assert "used: image, text; missing: \u2014\n" in out  # no prompt to choose
    found = re.findall(rf"used: text; missing: image; prompt: (\w+) \(scheduler: {kind}\)", out)
    assert len(found) == 1 and found[0] in PROMPT_CHOICES
    assert expected is None or found[0] == expected
    # What the turn says is what the LM read.
    assert (STATUS in inputs.text()) == (found[0] == "status_text")
    assert ("<missing>" in inputs.text()) == (found[0] == "learned")
    if kind != "fixed":
        assert "[test] accuracy: learned 0.433, status_text 0.500" in out
        assert "why: text: " in out
    if kind == "llm":
        assert "its LLM: the VLM's own SmolLM2" in out  # the VLM's LM scored the prompts


def test_projector_vlm_answerer_streams_tokens() -> None:
    from mllm_missing.chat import GenerativeAnswerer

    vlm = tiny_vlm()
    pieces: list[str] = []
    session = ChatSession(GenerativeAnswerer.from_projector_vlm(vlm.vlm, max_new_tokens=8))
    turn = session.ask(QUESTION, stream=pieces.append)
    assert "".join(pieces[:-1]) == turn.answer and len(pieces[:-1]) >= 2
    assert turn.answer == vlm.vlm.generate(QUESTION, max_new_tokens=8)


def test_web_streams_the_answer_as_lines_of_json(image: Path) -> None:
    import threading
    import urllib.request

    from mllm_missing.chat.web import make_server

    session = ChatSession(VLMAnswerer(tiny_vlm(), max_new_tokens=8))
    httpd = make_server(session, port=0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    host, port = httpd.server_address[:2]
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="text"\r\n\r\n{QUESTION}\r\n'
        f"--{boundary}--\r\n"
    ).encode()
    request = urllib.request.Request(
        f"http://{host!s}:{port}/ask?stream=1", data=body, method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.headers["Content-Type"] == "application/x-ndjson"
            messages = [json.loads(raw) for raw in response]
    finally:
        httpd.shutdown()
        httpd.server_close()
    *pieces, last = messages
    turn = last["turn"]
    assert len(pieces) >= 2 and all(set(m) == {"piece"} for m in pieces)
    assert "".join(m["piece"] for m in pieces) == turn["answer"]  # no status line among them
    assert turn["prompt"] == "learned" and turn["missing"] == ["image"]
    assert turn["status"] == "used: text; missing: image; prompt: learned (scheduler: fixed)"
