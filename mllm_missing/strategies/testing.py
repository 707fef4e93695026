"""The battery every strategy passes, and the tiny backbones it runs on.

`check_strategy(config, make_backbone, raw, modalities)` builds the strategy on a fresh frozen
backbone and asserts: it trains one step with gradients only on its own parameters (the backbone
stays bit-identical) and that step changes every adapted tower's outputs, its outputs depend on each sample's missing case when it says they do,
saving and reloading onto a fresh backbone gives identical outputs, and the same config with
``init="zero"`` leaves the frozen backbone's outputs unchanged. A strategy that retrieves is
fitted on the raw inputs' frozen embeddings (fewer entries than its k) and given each row's
retrieval context; the reloaded one must bring its own index back from its files.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mllm_missing.backbones.base import Backbone, assert_frozen
from mllm_missing.strategies.base import Strategy, StrategyConfig, build_strategy
from mllm_missing.types import MODALITY_ORDER, Modality

__all__ = ["TINY_CLIP_CONFIG", "case_presence", "check_strategy", "tiny_clip", "tiny_llama"]

#: A 2-block CLIP (vision width 64, text width 64) from an open_clip config, random weights.
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
_CORPUS = ["what color is the circle", "is there a red shape", "how many shapes are there"] * 4


def tiny_clip(seed: int = 0) -> Any:
    """A tiny open_clip CLIP behind the Backbone protocol (needs the ``clip`` extra)."""
    from mllm_missing.backbones.clip import load_clip

    torch.manual_seed(seed)
    return load_clip("tiny", model_cfg=TINY_CLIP_CONFIG)


def tiny_llama(seed: int = 0, blocks: int = 2) -> Any:
    """A tiny Llama causal LM (hidden 32) with a BPE tokenizer, as a text-tower backbone."""
    from transformers import LlamaForCausalLM

    from mllm_missing.backbones.hf import FrozenCausalLM
    from mllm_missing.backbones.hf_towers import CausalLMBackbone
    from mllm_missing.backbones.testing import tiny_llama_config, tiny_tokenizer

    tokenizer = tiny_tokenizer(_CORPUS)
    torch.manual_seed(seed)
    config = tiny_llama_config(len(tokenizer), num_hidden_layers=blocks)
    model = LlamaForCausalLM(config)
    return CausalLMBackbone(FrozenCausalLM(model, tokenizer, "tiny-llama"))


def case_presence(rows: int, modalities: Sequence[Modality]) -> torch.Tensor:
    """Bool (rows, 3) cycling through every missing case of `modalities`, complete first."""
    columns = [MODALITY_ORDER.index(Modality.parse(m)) for m in modalities]
    codes = list(range(2 ** len(columns) - 1, 0, -1))
    presence = torch.zeros(rows, len(MODALITY_ORDER), dtype=torch.bool)
    for row in range(rows):
        code = codes[row % len(codes)]
        for bit, column in enumerate(columns):
            presence[row, column] = bool(code >> bit & 1)
    return presence


def _outputs(
    strategy: Strategy,
    backbone: Backbone,
    inputs: Mapping[Modality, dict[str, torch.Tensor]],
    presence: torch.Tensor,
    frozen: Mapping[Modality, torch.Tensor],
) -> dict[Modality, torch.Tensor]:
    """Each tower's pooled output; a retrieving strategy gets the rows' retrieval context from
    their frozen embeddings."""
    context = None
    if strategy.retrieves:
        zeroed = {
            m: x * presence[:, MODALITY_ORDER.index(m)].unsqueeze(1) for m, x in frozen.items()
        }
        context = strategy.retrieval_context(zeroed, presence)
    return {m: strategy.encode(backbone, m, x, presence, context).pooled for m, x in inputs.items()}


#: The label count the battery builds strategies with (and labels its index rows over).
BATTERY_LABELS = 3


def _fit(strategy: Strategy, frozen: Mapping[Modality, torch.Tensor]) -> Strategy:
    """Fit a retrieving strategy's index on the complete rows' frozen embeddings, rows paired
    into groups and labelled by position."""
    if strategy.retrieves:
        rows = len(next(iter(frozen.values())))
        presence = torch.zeros(rows, len(MODALITY_ORDER), dtype=torch.bool)
        presence[:, [MODALITY_ORDER.index(m) for m in frozen]] = True
        strategy.fit_retrieval(
            frozen, presence, [f"bank-{i}" for i in range(rows)],
            groups=[f"group-{i // 2}" for i in range(rows)],
            labels=torch.arange(rows) % BATTERY_LABELS,
        )  # fmt: skip
    return strategy


def check_strategy(
    config: StrategyConfig,
    make_backbone: Callable[[], Backbone],
    raw: Mapping[Modality, Sequence[Any]],
    modalities: Sequence[Modality],
) -> None:
    """Run the shared battery; raises AssertionError naming the failed check.

    Args:
        config: the strategy config to check (its ``init`` is replaced by ``zero`` for the
            no-op check).
        make_backbone: builds a fresh backbone with the same weights every call.
        raw: raw inputs per tower to run (at least three each, the same count for every tower).
        modalities: the dataset's modalities (the missing cases).
    """
    backbone = make_backbone()
    strategy = build_strategy(config, backbone, modalities, num_labels=BATTERY_LABELS)
    name = config.method
    inputs = {m: backbone.prepare(m, list(x)) for m, x in raw.items()}
    rows = len(next(iter(raw.values())))
    presence = case_presence(rows, modalities)
    plain = {m: backbone.encode(m, x).pooled.detach() for m, x in inputs.items()}
    _fit(strategy, plain)

    own = strategy.trainable_parameters()
    assert own, f"{name}: no trainable parameters"
    own_ids = {id(p) for p in own}
    named = backbone.named_parameters()  # type: ignore[attr-defined]
    frozen = {n: p for n, p in named if id(p) not in own_ids}
    assert frozen, f"{name}: the backbone has no frozen parameters left"
    assert not any(p.requires_grad for p in frozen.values()), f"{name}: unfroze the backbone"
    before = {n: p.detach().clone() for n, p in frozen.items()}

    outputs = _outputs(strategy, backbone, inputs, presence, plain)
    adapted = [m for m in inputs if strategy.adapts(m)]
    assert adapted, f"{name}: adapts none of the towers {[m.value for m in inputs]}"
    loss = sum(o.float().pow(2).mean() for o in outputs.values())
    assert isinstance(loss, torch.Tensor)
    assert loss.requires_grad, f"{name}: the tower outputs do not depend on its parameters"
    loss.backward()
    assert all(p.grad is not None for p in own), f"{name}: a parameter got no gradient"
    assert any(bool(p.grad.abs().sum() > 0) for p in own if p.grad is not None), (
        f"{name}: every gradient is zero"
    )
    assert all(p.grad is None for p in frozen.values()), f"{name}: a backbone parameter got a grad"
    snapshot = [p.detach().clone() for p in own]
    torch.optim.SGD(own, lr=0.5).step()
    assert any(not torch.equal(p, s) for p, s in zip(own, snapshot)), (
        f"{name}: step changed nothing"
    )
    assert all(torch.equal(p, before[n]) for n, p in frozen.items()), f"{name}: backbone changed"
    assert_frozen_except(backbone, own_ids, name)

    with torch.no_grad():
        trained = _outputs(strategy, backbone, inputs, presence, plain)
        for m in adapted:
            assert not torch.allclose(trained[m], plain[m], atol=1e-4), (
                f"{name}: after a training step the {m.value} tower is still unchanged"
            )
        if getattr(strategy, "uses_presence", True):
            flipped = presence.roll(1, dims=0)
            other = _outputs(strategy, backbone, inputs, flipped, plain)
            assert any(not torch.allclose(trained[m], other[m], atol=1e-5) for m in adapted), (
                f"{name}: outputs do not depend on the missing case"
            )
        with tempfile.TemporaryDirectory() as folder:
            strategy.save_files(Path(folder))
            fresh_backbone = make_backbone()
            reloaded = build_strategy(config, fresh_backbone, modalities, num_labels=BATTERY_LABELS)
            reloaded.load_files(Path(folder))
            again = _outputs(reloaded, fresh_backbone, inputs, presence, plain)
        for m in inputs:
            assert torch.allclose(trained[m], again[m], atol=1e-6, rtol=1e-6), (
                f"{name}: reloaded outputs differ on the {m.value} tower"
            )

        zero_config = dataclasses.replace(config, init="zero")
        zero_backbone = make_backbone()
        zero_strategy = build_strategy(
            zero_config, zero_backbone, modalities, num_labels=BATTERY_LABELS
        )
        zero = _fit(zero_strategy, plain)
        for m, out in _outputs(zero, zero_backbone, inputs, presence, plain).items():
            assert torch.allclose(out, plain[m], atol=1e-5, rtol=1e-5), (
                f"{name}: init=zero changed the {m.value} tower's outputs"
            )


def assert_frozen_except(backbone: Backbone, allowed: set[int], name: str) -> None:
    """Every backbone parameter that is not the strategy's is frozen."""
    if not allowed:
        assert_frozen(backbone)  # type: ignore[arg-type]
        return
    for parameter_name, parameter in backbone.named_parameters():  # type: ignore[attr-defined]
        if id(parameter) not in allowed:
            assert not parameter.requires_grad, f"{name}: {parameter_name} requires grad"


def tiny_classifier(
    strategy: str = "none",
    imputation: str = "zero",
    backbone: Any = None,
    labels: Sequence[str] = ("circle", "square", "triangle"),
    strategy_fields: Mapping[str, Any] | None = None,
) -> Any:
    """An image + text classifier over a tiny CLIP (random weights), concat fusion, eval mode.

    A prompt strategy gets 2 prompts per block (and `strategy_fields`), randomised so adapted
    towers differ from the frozen ones.
    """
    from mllm_missing.model import build_model

    backbone = backbone or tiny_clip()
    fields = {"prompt_length": 2, **(strategy_fields or {})} if strategy != "none" else {}
    spec = {
        "backbone": "clip-vit-b-16",
        "strategy": {"method": strategy, **fields},
        "imputation": imputation,
        "fusion": "concat",
        "hidden_size": 16,
        "routed_head": False,
        "task": "shapes",
        "task_type": "multiclass",
        "num_labels": len(labels),
        "label_names": list(labels),
        "modalities": ["image", "text"],
    }
    torch.manual_seed(0)
    dims = {m: backbone.embed_dim(m) for m in (Modality.IMAGE, Modality.TEXT)}
    model = build_model(spec, backbone, dims)
    if strategy != "none":
        with torch.no_grad():
            for p in model.strategy.parameters():
                p.normal_(0, 0.5)
    return model.eval()
