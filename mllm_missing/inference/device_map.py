"""Multi-GPU placement: split a backbone too big for one GPU across several, CPU/disk as a last resort.

`plan_device_map` builds the model on the meta device (no memory, no weights) from its config,
and asks accelerate's ``infer_auto_device_map`` where each block goes under per-device budgets
(``{0: "20GiB", 1: "20GiB", "cpu": "64GiB"}``). Blocks are never split across devices
(``no_split_module_classes``, by default the model's own ``_no_split_modules``, e.g.
``LlamaDecoderLayer``), so consecutive layers fill GPU 0, then GPU 1, and so on. The result is a
plain ``device_map`` for ``from_pretrained(..., device_map=plan)`` (or
`mllm_missing.inference.quantization.load_quantized_causal_lm`). Budgets may name GPUs this
machine does not have: a plan can be made for another machine.

accelerate keeps room for the largest block on the first GPU (and the CPU) in case an offloaded
block must be brought in to run, so a budget must exceed what it holds by one block.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mllm_missing.errors import ConfigError

__all__ = ["OFFLOAD_CHOICES", "DevicePlan", "plan_device_map"]

logger = logging.getLogger(__name__)

OFFLOAD_CHOICES = ("cpu", "disk", None)
_OFFLOADED = ("cpu", "disk")


@dataclass
class DevicePlan:
    """Where each part of a model goes, and how many bytes each device holds.

    Attributes:
        device_map: module name -> device (GPU index, ``"cpu"`` or ``"disk"``), as accelerate and
            ``from_pretrained`` read it.
        bytes_per_device: device -> bytes of parameters and buffers placed there.
        layers: device -> indices of the repeated blocks (``model.layers.N``) placed there.
        budgets: device -> the budget planned with, in bytes.
        total_bytes: the whole model's size at the planned dtype.
        offloaded: module names placed on ``"cpu"`` or ``"disk"``.
    """

    device_map: dict[str, int | str]
    bytes_per_device: dict[int | str, int]
    layers: dict[int | str, list[int]]
    budgets: dict[int | str, int]
    total_bytes: int
    offloaded: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line per device: bytes used of the budget and the blocks it holds."""
        lines = []
        for device, used in self.bytes_per_device.items():
            budget = self.budgets.get(device)
            share = f" of {_gib(budget)}" if budget else ""
            blocks = self.layers.get(device, [])
            span = f", blocks {_ranges(blocks)}" if blocks else ""
            lines.append(f"{device}: {_gib(used)}{share}{span}")
        return "\n".join(lines)


def _gib(value: int) -> str:
    """A byte count in the largest unit that keeps it at least 1 (``1.50 GiB``, ``240.5 KiB``)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value} B"


def _ranges(values: list[int]) -> str:
    parts: list[str] = []
    start = prev = values[0]
    for v in [*values[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(parts)


def _meta_model(model_or_config: Any) -> nn.Module:
    """The model on the meta device: an ``nn.Module`` as is, else built from a config or folder."""
    if isinstance(model_or_config, nn.Module):
        return model_or_config
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    config = model_or_config
    if isinstance(config, (str, Path)):
        if not Path(config).is_dir():
            raise ConfigError(f"plan_device_map: {config} is not a local model folder")
        config = AutoConfig.from_pretrained(str(config), local_files_only=True)
    if not isinstance(config, PretrainedConfig):
        raise ConfigError(
            "plan_device_map: pass an nn.Module, a transformers config or a model folder; got "
            f"{type(model_or_config).__name__}"
        )
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def _budgets(max_memory: dict[int | str, int | str]) -> dict[int | str, int]:
    from accelerate.utils import convert_file_size_to_int

    if not max_memory:
        raise ConfigError("plan_device_map: max_memory must name at least one device budget")
    budgets: dict[int | str, int] = {}
    for device, value in max_memory.items():
        if not (isinstance(device, int) and device >= 0) and device not in _OFFLOADED:
            raise ConfigError(
                f"max_memory: device {device!r} must be a GPU index (0, 1, ...), 'cpu' or 'disk'"
            )
        try:
            size = convert_file_size_to_int(value) if isinstance(value, str) else int(value)
        except ValueError:
            raise ConfigError(
                f"max_memory[{device!r}]: {value!r} is not a size such as 20GiB"
            ) from None
        if size < 0:
            raise ConfigError(f"max_memory[{device!r}] must be >= 0; got {value!r}")
        budgets[device] = size
    return budgets


def _block_index(name: str, prefixes: Iterable[str]) -> int | None:
    for prefix in prefixes:
        if name.startswith(prefix + "."):
            head = name[len(prefix) + 1 :].split(".", 1)[0]
            if head.isdigit():
                return int(head)
    return None


def plan_device_map(
    model_or_config: Any,
    max_memory: dict[int | str, int | str],
    *,
    dtype: torch.dtype | str = torch.bfloat16,
    no_split_module_classes: list[str] | None = None,
    offload: str | None = "cpu",
) -> DevicePlan:
    """Plan where each block of a model goes under per-device memory budgets.

    Args:
        model_or_config: a transformers config, a local model folder (its ``config.json``), or an
            ``nn.Module`` (e.g. already built on the meta device).
        max_memory: device -> budget, in bytes or as ``"20GiB"``; GPUs by index, plus optionally
            ``"cpu"`` (and ``"disk"``).
        dtype: the dtype the weights will have (sizes are computed at it). For a model to be
            loaded in 4 or 8 bits, planning at ``bfloat16`` is conservative (over-estimates the
            quantized layers); `load_quantized_causal_lm` with ``device_map="auto"`` and
            ``max_memory`` lets transformers plan at the quantized sizes instead.
        no_split_module_classes: classes never split across devices (default: the model's
            ``_no_split_modules``).
        offload: ``"cpu"``: what does not fit on the GPUs goes to the CPU (budget ``max_memory["cpu"]``,
            unlimited if absent); ``"disk"``: then to disk; None: everything must fit on the GPUs.

    Returns:
        The plan (`DevicePlan.device_map` is what ``from_pretrained`` takes).

    Raises:
        ConfigError: a bad device or size, or the budgets cannot hold the model with this
            offload setting (the message gives the model size and the budgets).
    """
    if offload not in OFFLOAD_CHOICES:
        raise ConfigError(f"offload must be one of 'cpu', 'disk', None; got {offload!r}")
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes

    budgets = _budgets(max_memory)
    resolved = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype):
        raise ConfigError(f"dtype must be a torch dtype such as bfloat16; got {dtype!r}")
    model = _meta_model(model_or_config)
    no_split = list(no_split_module_classes or getattr(model, "_no_split_modules", None) or [])
    planned: dict[int | str, int] = {k: v for k, v in budgets.items() if isinstance(k, int)}
    if offload in _OFFLOADED:
        planned["cpu"] = budgets.get("cpu", 2**62)
    if offload == "disk":
        planned["disk"] = budgets.get("disk", 2**62)
    accelerate_logger = logging.getLogger("accelerate.utils.modeling")
    level = accelerate_logger.level
    accelerate_logger.setLevel(logging.ERROR)  # GPUs absent here are planned for, not warned about
    try:
        device_map = infer_auto_device_map(
            model, max_memory=dict(planned), no_split_module_classes=no_split, dtype=resolved
        )
    finally:
        accelerate_logger.setLevel(level)
    sizes = compute_module_sizes(model, dtype=resolved)
    total = int(sizes[""])
    allowed = {d for d in planned if d != "disk"} | ({"disk"} if offload == "disk" else set())
    stray = sorted({str(d) for d in device_map.values() if d not in allowed})
    if stray:
        gpus = ", ".join(f"{k}: {_gib(v)}" for k, v in planned.items() if k not in _OFFLOADED)
        hint = (
            "raise the budgets or allow offload='cpu'"
            if offload is None
            else "raise the budgets or allow offload='disk'"
        )
        raise ConfigError(
            f"plan_device_map: the model needs {_gib(total)} at {resolved} and does not fit "
            f"in the budgets ({gpus or 'no GPU'}"
            f"{', cpu: ' + _gib(planned['cpu']) if 'cpu' in planned and offload else ''}) with "
            f"offload={offload!r} (parts would go to {', '.join(stray)}); {hint}"
        )
    used: dict[int | str, int] = {}
    layers: dict[int | str, list[int]] = {}
    prefixes = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    for name, device in device_map.items():
        used[device] = used.get(device, 0) + int(sizes[name])
        index = _block_index(name, prefixes)
        if index is not None:
            layers.setdefault(device, []).append(index)
        elif any(p == name or p.startswith(name + ".") or not name for p in prefixes):
            # a whole container of blocks on one device
            for prefix in prefixes:
                if prefix == name or prefix.startswith(name + ".") or not name:
                    count = len(list(model.get_submodule(prefix).children()))
                    layers.setdefault(device, []).extend(range(count))
    for values in layers.values():
        values.sort()
    offloaded = [n for n, d in device_map.items() if d in _OFFLOADED]
    return DevicePlan(
        device_map=dict(device_map),
        bytes_per_device=used,
        layers=layers,
        budgets={k: v for k, v in planned.items() if v < 2**62},
        total_bytes=total,
        offloaded=offloaded,
    )
