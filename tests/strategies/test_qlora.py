"""QLoRA: the `lora` strategy on a bitsandbytes-quantized tiny Llama (CPU backend), and refusals.

The quantized tiny Llamas compute in float32 for the battery (its checks compare outputs at
1e-5); the default bf16 compute is checked for dtypes and layout.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from mllm_missing.errors import ConfigError
from mllm_missing.strategies.base import build_strategy, strategy_config_from_dict
from mllm_missing.strategies.testing import case_presence, check_strategy
from mllm_missing.types import Modality
from tests.strategies.test_battery import TEXTS

IMAGE, TEXT = Modality.IMAGE, Modality.TEXT
MODALITIES = (IMAGE, TEXT)
_CORPUS = ["what color is the circle", "is there a red shape", "how many shapes are there"] * 4


def tiny_float_llama() -> Any:
    """A tiny Llama (hidden 64: 4-bit on the CPU needs widths that are multiples of 64) as a
    text-tower backbone, float32."""
    from transformers import LlamaForCausalLM

    from mllm_missing.backbones.hf import FrozenCausalLM
    from mllm_missing.backbones.hf_towers import CausalLMBackbone
    from mllm_missing.backbones.testing import tiny_llama_config, tiny_tokenizer

    tokenizer = tiny_tokenizer(_CORPUS)
    torch.manual_seed(0)
    config = tiny_llama_config(len(tokenizer), hidden_size=64, intermediate_size=128)
    return CausalLMBackbone(FrozenCausalLM(LlamaForCausalLM(config), tokenizer, "tiny-llama"))


def quantized_llama(mode: str = "nf4", compute_dtype: str = "float32") -> Any:
    """`tiny_float_llama` with its LLM quantized on the CPU."""
    from mllm_missing.inference.quantization import QuantizationConfig, quantize_model

    backbone = tiny_float_llama()
    config = QuantizationConfig(mode=mode, compute_dtype=compute_dtype)
    quantize_model(backbone.llm.model, config, "cpu")
    return backbone


@pytest.fixture(autouse=True)
def _bnb_cpu() -> None:
    pytest.importorskip("bitsandbytes")
    from mllm_missing.inference.quantization import cpu_backend_works

    if not cpu_backend_works():
        pytest.skip("the installed bitsandbytes has no working CPU backend")
    warnings.filterwarnings("ignore", message="MatMul8bitLt")


def lora(**values: Any) -> Any:
    return strategy_config_from_dict({"method": "lora", "r": 2, **values})


def pooled(strategy: Any, backbone: Any, presence: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        inputs = backbone.prepare(TEXT, TEXTS)
        return strategy.encode(backbone, TEXT, inputs, presence).pooled.float()


@pytest.mark.bnb
@pytest.mark.parametrize("routed", [False, True])
@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_battery_on_a_quantized_tiny_llama(mode: str, routed: bool) -> None:
    """The shared strategy battery: one step trains only the adapters, save/reload identical,
    zero init leaves the quantized tower's outputs unchanged, routed outputs depend on the case."""
    check_strategy(lora(routed=routed), lambda: quantized_llama(mode), {TEXT: TEXTS}, MODALITIES)


@pytest.mark.bnb
def test_adapters_wrap_the_quantized_layers_in_the_compute_dtype(tmp_path: Path) -> None:
    backbone = quantized_llama("nf4", compute_dtype="bfloat16")
    strategy = build_strategy(lora(routed=True), backbone, MODALITIES)
    assert strategy.quantized
    layer = backbone.llm.model.model.layers[0].self_attn.q_proj
    assert type(layer).__module__.startswith("peft") and type(layer.base_layer).__name__ == (
        "Linear4bit"
    )
    assert {p.dtype for p in strategy.trainable_parameters()} == {torch.bfloat16}
    strategy.save_files(tmp_path)
    for case in ("image", "text", "image+text"):
        assert (tmp_path / case / "adapter_config.json").is_file()
        assert (tmp_path / case / "adapter_model.safetensors").is_file()


@pytest.mark.bnb
def test_gradients_equal_those_of_the_dequantized_float_model() -> None:
    """After an inference pass (which makes bitsandbytes repack 4-bit weights for a CPU kernel
    with no backward), LoRA gradients still flow through the frozen 4-bit layers: they equal the
    gradients on a float model holding the dequantized weights."""
    import bitsandbytes.functional as functional

    backbone = quantized_llama("nf4")
    strategy = build_strategy(lora(), backbone, MODALITIES)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for adapter in strategy.adapters:
            for p in adapter["lora_B"].parameters():  # type: ignore[index]
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    presence = case_presence(len(TEXTS), MODALITIES)
    pooled(strategy, backbone, presence)  # an inference pass first
    inputs = backbone.prepare(TEXT, TEXTS)
    strategy.encode(backbone, TEXT, inputs, presence).pooled.pow(2).sum().backward()

    reference = tiny_float_llama()
    model = backbone.llm.model
    for name, module in model.named_modules():
        if type(module).__name__ == "Linear4bit":
            weight = functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            target = name.removesuffix(".base_layer")  # peft wraps the layer
            reference.llm.model.get_submodule(target).weight.data = weight.float()
    twin = build_strategy(lora(), reference, MODALITIES)
    twin.load_state_dict(strategy.state_dict())
    twin.encode(reference, TEXT, inputs, presence).pooled.pow(2).sum().backward()
    first = [p.grad for p in strategy.trainable_parameters()]
    second = [p.grad for p in twin.trainable_parameters()]
    # every adapter, including block 0's, whose gradient crosses block 1's 4-bit layers
    for a, b in zip(first, second):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)


@pytest.mark.bnb
def test_qlora_in_bf16_compute_prepares_the_base_for_training() -> None:
    """QLoRA's recipe: the base's 16-bit norms and embeddings are cast to float32 by peft."""
    backbone = quantized_llama("nf4", compute_dtype="bfloat16")
    norm = backbone.llm.model.model.norm.weight
    assert norm.dtype == torch.bfloat16
    zero = build_strategy(dataclasses.replace(lora(), init="zero"), backbone, MODALITIES)
    assert zero.quantized and backbone.llm.model.model.norm.weight.dtype == torch.float32
    assert backbone.llm.model.get_input_embeddings().weight.dtype == torch.float32


@pytest.mark.bnb
def test_quantization_is_refused_outside_transformers_llms() -> None:
    from mllm_missing.backbones.presets import get_backbone

    with pytest.raises(ConfigError, match=r"quantization 'nf4' is supported for the hf_causal"):
        get_backbone("minilm-l6", quantization="nf4")
    with pytest.raises(ConfigError, match="quantization.mode must be one of"):
        get_backbone("smollm2-135m-instruct", quantization="int3")


@pytest.mark.bnb
def test_bnb_layers_in_a_non_transformers_tower_are_refused() -> None:
    pytest.importorskip("open_clip")
    from mllm_missing.strategies.testing import tiny_clip

    backbone = tiny_clip()
    layer = backbone.model.visual.transformer.resblocks[0].mlp.c_fc
    fake = type("Linear4bit", (torch.nn.Linear,), {"__module__": "bitsandbytes.nn.modules"})
    layer.__class__ = fake
    with pytest.raises(ConfigError, match="QLoRA is supported on quantized transformers LLMs"):
        build_strategy(lora(), backbone, MODALITIES)


@pytest.mark.slow
@pytest.mark.bnb
def test_smollm2_preset_in_nf4_embeds_close_to_float() -> None:
    pytest.importorskip("gguf")
    from mllm_missing.backbones.presets import get_backbone
    from mllm_missing.inference.quantization import quantized_layers

    texts = ["what color is the circle?", "is there a red shape in the image?"]
    full = get_backbone("smollm2-135m-instruct").embed(TEXT, texts).float()
    backbone = get_backbone("smollm2-135m-instruct", quantization="nf4")
    assert len(quantized_layers(backbone.llm.model)) == 30 * 7
    quantized = backbone.embed(TEXT, texts).float()
    similarity = torch.nn.functional.cosine_similarity(quantized, full, dim=-1)
    assert bool((similarity > 0.9).all()), similarity


def test_train_config_quantization_is_checked() -> None:
    from mllm_missing.training.config import TrainConfig

    config = TrainConfig(backbone="smollm2-135m-instruct", quantization="nf4")
    assert config.quantization == "nf4"
    with pytest.raises(ConfigError, match="quantization.mode must be one of none, int8, nf4"):
        TrainConfig(backbone="smollm2-135m-instruct", quantization="q4")
    with pytest.raises(ConfigError, match="applies to transformers LLM presets"):
        TrainConfig(backbone="offline-default", quantization="int8")


def test_a_qlora_checkpoint_reloads_on_its_quantized_backbone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`load_checkpoint` passes the training's quantization to the preset (or an override)."""
    from mllm_missing.inference.predict import load_checkpoint
    from mllm_missing.model import build_model

    backbone = tiny_float_llama()
    spec = {
        "backbone": "smollm2-135m-instruct", "strategy": {"method": "none"},
        "hidden_size": 8, "task_type": "multiclass", "num_labels": 2,
        "modalities": ["text"], "training": {"quantization": "nf4"},
    }  # fmt: skip
    build_model(spec, backbone, {TEXT: backbone.embed_dim(TEXT)}).save_pretrained(tmp_path)
    seen: list[Any] = []

    def fake_get_backbone(name: str, **options: Any) -> Any:
        seen.append(options.get("quantization"))
        return backbone

    monkeypatch.setattr("mllm_missing.backbones.presets.get_backbone", fake_get_backbone)
    load_checkpoint(tmp_path, device="cpu")
    load_checkpoint(tmp_path, device="cpu", quantization="none")
    assert seen == ["nf4", None]
