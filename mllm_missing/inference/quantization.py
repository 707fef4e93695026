"""Quantized transformers LLMs through bitsandbytes: 8-bit (LLM.int8) and 4-bit (NF4 / FP4).

Two ways in, one config (`QuantizationConfig`):

- `load_quantized_causal_lm` loads a checkpoint folder with ``from_pretrained`` and a
  ``BitsAndBytesConfig`` (`to_bnb_config`), the memory-frugal path for big checkpoints
  (weights are quantized as they are read, with ``device_map`` / ``max_memory`` placement);
- `quantize_model` converts an in-memory float model's ``nn.Linear`` layers (except
  ``skip_modules``) to bitsandbytes ``Linear8bitLt`` / ``Linear4bit`` in place, copying the
  weights. This is what the backbone presets use (``get_backbone(..., quantization=...)``), and
  it lets random-weight models at real sizes be quantized with no checkpoint on disk.

As in bitsandbytes, the weights are quantized when the converted layers are moved to their
device (``.to(device)``), which `quantize_model` does. The GPU (CUDA) path is bitsandbytes'
main path. Recent bitsandbytes (0.49+) also has a CPU backend; `cpu_backend_works` checks it on
this machine by a round trip before anything is quantized on the CPU. bitsandbytes 0.50.2's CPU
4-bit dequantization mixes up blocks when a layer's input width is not a multiple of the block
size (64), so such layers are refused on the CPU with a message (real LLM widths are multiples
of 64; GPU kernels are not affected).

Importing this module does not import bitsandbytes or transformers.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mllm_missing.errors import ConfigError, MissingDependencyError

__all__ = [
    "BLOCKSIZE",
    "MODES",
    "QuantizationConfig",
    "cpu_backend_works",
    "enable_training_kernels",
    "is_bnb_available",
    "is_quantized",
    "load_quantized_causal_lm",
    "quantize_model",
    "quantized_layers",
    "to_bnb_config",
]

logger = logging.getLogger(__name__)

MODES = ("none", "int8", "nf4", "fp4")
_COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
#: bitsandbytes' 4-bit block size used here (its default on CUDA and CPU).
BLOCKSIZE = 64
_INSTALL = "pip install 'mllm-missing[quant]'"


@dataclass(frozen=True)
class QuantizationConfig:
    """How to quantize an LLM's linear layers with bitsandbytes.

    Args:
        mode: ``none`` (float weights), ``int8`` (LLM.int8, outlier threshold 6.0), ``nf4`` or
            ``fp4`` (4-bit, blocks of 64 weights).
        double_quant: 4-bit only: also quantize the per-block scales (QLoRA's double
            quantization, about 0.4 bits per weight saved).
        compute_dtype: dtype of the 4-bit matmuls and of the layers left unquantized
            (embeddings, norms, ``skip_modules``).
        skip_modules: names (or dotted suffixes) of linear layers kept in float; by default the
            output head, whose errors go straight to the logits.
    """

    mode: str = "none"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    skip_modules: tuple[str, ...] = ("lm_head",)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(
                f"quantization.mode must be one of {', '.join(MODES)}; got {self.mode!r}"
            )
        if not isinstance(self.double_quant, bool):
            raise ConfigError(
                f"quantization.double_quant must be true or false; got {self.double_quant!r}"
            )
        if self.compute_dtype not in _COMPUTE_DTYPES:
            raise ConfigError(
                f"quantization.compute_dtype must be one of {', '.join(_COMPUTE_DTYPES)}; "
                f"got {self.compute_dtype!r}"
            )
        skip = (self.skip_modules,) if isinstance(self.skip_modules, str) else self.skip_modules
        if not all(isinstance(s, str) and s.strip(".") for s in skip):
            raise ConfigError(f"quantization.skip_modules must be module names; got {skip!r}")
        object.__setattr__(self, "skip_modules", tuple(skip))

    @property
    def enabled(self) -> bool:
        """Whether any layer is quantized."""
        return self.mode != "none"

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        """`compute_dtype` as a torch dtype."""
        dtype: torch.dtype = getattr(torch, self.compute_dtype)
        return dtype

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (what `parse` reads back)."""
        data = asdict(self)
        data["skip_modules"] = list(self.skip_modules)
        return data

    @classmethod
    def parse(cls, value: QuantizationConfig | str | dict[str, Any] | None) -> QuantizationConfig:
        """A config from a config, a mode name (``"nf4"``), a dict of fields, or None (none).

        Raises:
            ConfigError: an unknown field or a bad value (named).
        """
        if isinstance(value, QuantizationConfig):
            return value
        if value is None:
            return cls()
        if isinstance(value, str):
            return cls(mode=value)
        if isinstance(value, dict):
            known = {"mode", "double_quant", "compute_dtype", "skip_modules"}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ConfigError(
                    f"quantization: unknown field(s) {unknown}; allowed: {sorted(known)}"
                )
            data = dict(value)
            if "skip_modules" in data and not isinstance(data["skip_modules"], str):
                data["skip_modules"] = tuple(data["skip_modules"])
            return cls(**data)
        raise ConfigError(f"quantization must be a mode name or a mapping; got {value!r}")


def is_bnb_available() -> bool:
    """Whether bitsandbytes is installed (found without importing it)."""
    return importlib.util.find_spec("bitsandbytes") is not None


def _bnb() -> Any:
    if not is_bnb_available():
        raise MissingDependencyError(
            f"quantized loading needs bitsandbytes; install it with: {_INSTALL}"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes

    return bitsandbytes


@cache
def cpu_backend_works() -> bool:
    """Whether the installed bitsandbytes quantizes and dequantizes 4-bit and 8-bit on the CPU.

    Checked once by a round trip of a small tensor (NF4 error below 0.2 of the weights' norm,
    int8 below 0.02), so an older bitsandbytes with no CPU backend is detected, not assumed.
    """
    try:
        bnb = _bnb()
        functional = bnb.functional
        weight = torch.randn(128, 64, generator=torch.Generator().manual_seed(0))
        packed, state = functional.quantize_4bit(weight, blocksize=BLOCKSIZE, quant_type="nf4")
        back = functional.dequantize_4bit(packed, state)
        nf4 = float((back.float() - weight).norm() / weight.norm())
        layer = bnb.nn.Linear8bitLt(64, 128, bias=False, has_fp16_weights=False, threshold=6.0)
        layer.weight = bnb.nn.Int8Params(
            weight.clone(), requires_grad=False, has_fp16_weights=False
        )
        layer = layer.to("cpu")
        x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = layer(x).float()
        int8 = float((out - x @ weight.T).norm() / (x @ weight.T).norm())
    except MissingDependencyError:
        raise
    except Exception as exc:  # any failure means: no usable CPU backend
        logger.debug("bitsandbytes CPU round trip failed: %s", exc)
        return False
    return nf4 < 0.2 and int8 < 0.02


def to_bnb_config(config: QuantizationConfig) -> Any:
    """The transformers ``BitsAndBytesConfig`` of `config`.

    Raises:
        ConfigError: ``mode`` is ``none``.
        MissingDependencyError: bitsandbytes is not installed.
    """
    if not config.enabled:
        raise ConfigError("quantization.mode is 'none': there is no bitsandbytes config to build")
    _bnb()
    from transformers import BitsAndBytesConfig

    skip = list(config.skip_modules) or None
    if config.mode == "int8":
        return BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=6.0, llm_int8_skip_modules=skip
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.mode,
        bnb_4bit_use_double_quant=config.double_quant,
        bnb_4bit_compute_dtype=config.torch_compute_dtype,
        llm_int8_skip_modules=skip,
    )


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _check_device(config: QuantizationConfig, device: torch.device, widths: dict[str, int]) -> None:
    """Refuse a quantization this machine's bitsandbytes cannot do on `device`."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("quantization on cuda requested but no CUDA device is available")
        return
    if device.type != "cpu":
        raise ConfigError(
            f"quantization on {device.type!r} is not supported here; use a CUDA GPU or the CPU"
        )
    if not cpu_backend_works():
        raise ConfigError(
            "the installed bitsandbytes cannot quantize on the CPU (no working CPU backend; "
            "0.49 or later has one): quantize on a CUDA GPU, or upgrade bitsandbytes"
        )
    if config.mode in ("nf4", "fp4"):
        odd = [n for n, w in widths.items() if w % BLOCKSIZE]
        if odd:
            raise ConfigError(
                f"4-bit on the CPU: layer {odd[0]!r} has input width {widths[odd[0]]}, not a "
                f"multiple of {BLOCKSIZE}; bitsandbytes' CPU kernel dequantizes such layers "
                f"wrongly ({len(odd)} layer(s)). Add them to quantization.skip_modules, use int8, "
                "or quantize on a GPU"
            )


def _targets(model: nn.Module, config: QuantizationConfig) -> dict[str, nn.Linear]:
    return {
        name: module
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not _matches(name, config.skip_modules)
    }


def _convert(layer: nn.Linear, config: QuantizationConfig, bnb: Any) -> nn.Module:
    weight = layer.weight.detach().float().cpu()
    bias = layer.bias
    new: nn.Module
    if config.mode == "int8":
        new = bnb.nn.Linear8bitLt(
            layer.in_features,
            layer.out_features,
            bias=bias is not None,
            has_fp16_weights=False,
            threshold=6.0,
        )
        new.weight = bnb.nn.Int8Params(
            weight.to(torch.float16), requires_grad=False, has_fp16_weights=False
        )
    else:
        new = bnb.nn.Linear4bit(
            layer.in_features,
            layer.out_features,
            bias=bias is not None,
            compute_dtype=config.torch_compute_dtype,
            compress_statistics=config.double_quant,
            quant_type=config.mode,
        )
        new.weight = bnb.nn.Params4bit(
            weight,
            requires_grad=False,
            blocksize=BLOCKSIZE,
            compress_statistics=config.double_quant,
            quant_type=config.mode,
            module=new,
        )
    if bias is not None:
        new.bias = nn.Parameter(
            bias.detach().to(config.torch_compute_dtype).cpu(), requires_grad=False
        )
    new.train(layer.training)
    return new


def quantize_model(
    model: nn.Module, config: QuantizationConfig, device: str | torch.device | None = None
) -> nn.Module:
    """Convert `model`'s ``nn.Linear`` layers (except ``skip_modules``) to bitsandbytes layers
    in place, copying their weights, and move the model to `device`, which quantizes them.

    The rest of the model (embeddings, norms, skipped layers) is cast to ``compute_dtype``.
    Needs CUDA, or a bitsandbytes with a working CPU backend (`cpu_backend_works`); see the
    module docstring for the 4-bit CPU width restriction.

    Args:
        model: a float model (e.g. a transformers ``*ForCausalLM``), on the CPU or any device.
        config: the quantization; ``none`` returns the model unchanged.
        device: where the quantized model goes (default: CUDA if available, else the CPU).

    Returns:
        The same model object, quantized.

    Raises:
        MissingDependencyError: bitsandbytes is not installed (the install command is named).
        ConfigError: the model is already quantized, has no linear layer to quantize, or the
            combination is unsupported on `device`.
    """
    if not config.enabled:
        return model
    bnb = _bnb()
    if is_quantized(model):
        raise ConfigError("quantize_model: the model already has bitsandbytes layers")
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    layers = _targets(model, config)
    if not layers:
        raise ConfigError(
            "quantize_model: no nn.Linear layer to quantize (skip_modules: "
            f"{', '.join(config.skip_modules) or 'none'})"
        )
    _check_device(config, target, {n: m.in_features for n, m in layers.items()})
    # One layer at a time, from its own float weights, so at most one extra copy is alive.
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _convert(layer, config, bnb))
    converted = set(layers)
    for name, module in model.named_modules():
        if name in converted:
            continue
        for parameter in module.parameters(recurse=False):
            if parameter.is_floating_point():
                parameter.data = parameter.data.to("cpu", config.torch_compute_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bnb's casting notices on the CPU
        model.to(target)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    _mark(model, config)
    return model


def _mark(model: nn.Module, config: QuantizationConfig) -> None:
    """Set the flags transformers and peft read to tell a quantized model."""
    flag = "is_loaded_in_8bit" if config.mode == "int8" else "is_loaded_in_4bit"
    try:
        setattr(model, flag, True)
        model.mllm_quantization = config  # type: ignore[assignment]
    except (AttributeError, TypeError):  # a read-only property on some classes
        pass


def enable_training_kernels(model: nn.Module) -> int:
    """Keep `model`'s 4-bit layers on bitsandbytes' differentiable path on the CPU.

    On a CPU with AVX512-BF16, bitsandbytes (0.49+) repacks a ``Linear4bit``'s weights the first
    time it runs in eval mode on an input without gradients, and from then on always calls a
    kernel with no backward: a frozen (eval-mode) base under LoRA would then pass no gradient
    back through its layers to earlier adapters, silently (torch only warns). QLoRA needs the
    gradient, so this undoes the repacking and switches it off (inference runs the plain
    dequantize + matmul path instead). A no-op on CUDA layers.

    Returns:
        How many layers were switched.
    """
    switched = 0
    module: Any
    for module in model.modules():
        if type(module).__name__ not in ("Linear4bit", "LinearNF4", "LinearFP4"):
            continue
        weight: Any = module.weight
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                weight.data, state
            )
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of `model`'s bitsandbytes linear layers (empty for a float model)."""
    return [
        name
        for name, module in model.named_modules()
        if type(module).__module__.startswith("bitsandbytes")
        and type(module).__name__ in ("Linear4bit", "Linear8bitLt", "LinearNF4", "LinearFP4")
    ]


def is_quantized(model: nn.Module) -> bool:
    """Whether `model` holds bitsandbytes linear layers."""
    return bool(quantized_layers(model))


def load_quantized_causal_lm(
    path_or_model_dir: str | Path,
    config: QuantizationConfig,
    *,
    device_map: str | dict[str, Any] | None = "auto",
    max_memory: dict[int | str, int | str] | None = None,
) -> Any:
    """Load a local causal-LM checkpoint quantized as it is read (``from_pretrained`` with the
    ``BitsAndBytesConfig`` of `config`).

    Args:
        path_or_model_dir: a local transformers checkpoint folder (never downloaded).
        config: the quantization (not ``none``).
        device_map: ``"auto"``, a plan from `mllm_missing.inference.device_map.plan_device_map`,
            or a device name such as ``"cuda:0"`` or ``"cpu"``.
        max_memory: per-device budgets for ``"auto"`` (e.g. ``{0: "20GiB", "cpu": "64GiB"}``).

    Returns:
        The quantized ``*ForCausalLM`` model, frozen, in eval mode.

    Raises:
        ModelNotFoundError: the folder does not exist.
        MissingDependencyError, ConfigError: as `quantize_model`.
    """
    from mllm_missing.backbones.gguf import ModelNotFoundError

    folder = Path(path_or_model_dir)
    if not folder.is_dir():
        raise ModelNotFoundError(
            f"model {str(path_or_model_dir)!r} not found locally; pass a checkpoint folder"
        )
    bnb_config = to_bnb_config(config)
    devices = device_map.values() if isinstance(device_map, dict) else [device_map or "cpu"]
    if any(str(d).startswith("cpu") or str(d) == "disk" for d in devices) or (
        device_map == "auto" and not torch.cuda.is_available()
    ):
        _check_device(config, torch.device("cpu"), {})
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(
            str(folder),
            quantization_config=bnb_config,
            device_map=device_map,
            max_memory=max_memory,
            dtype=config.torch_compute_dtype,
            local_files_only=True,
        )
    if next(iter(model.parameters())).device.type == "cpu" and config.mode in ("nf4", "fp4"):
        odd = {
            n: m.in_features
            for n, m in model.named_modules()
            if type(m).__name__ == "Linear4bit" and m.in_features % BLOCKSIZE
        }
        _check_device(config, torch.device("cpu"), odd)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model
