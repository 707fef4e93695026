"""Inference: quantized loading (bitsandbytes), multi-GPU device maps, the batched engine, vLLM.

Importing this package imports none of bitsandbytes, vllm or transformers: the public names
below load their module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "DevicePlan",
    "InferenceEngine",
    "ModuleSelector",
    "QuantizationConfig",
    "VLLMBackend",
    "build_requests",
    "is_bnb_available",
    "load_quantized_causal_lm",
    "plan_device_map",
    "quantize_model",
    "to_bnb_config",
]

_WHERE = {
    "DevicePlan": "device_map",
    "plan_device_map": "device_map",
    "InferenceEngine": "engine",
    "ModuleSelector": "engine",
    "QuantizationConfig": "quantization",
    "is_bnb_available": "quantization",
    "load_quantized_causal_lm": "quantization",
    "quantize_model": "quantization",
    "to_bnb_config": "quantization",
    "VLLMBackend": "vllm_backend",
    "build_requests": "vllm_backend",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_WHERE[name]}")
    return getattr(module, name)
