"""Backbone presets: name -> model, dtype, modalities, hidden sizes, LoRA targets; and `get_backbone`.

Presets live as JSON files in ``backbones/presets/``. `preset_status` says whether a preset loads
on this machine without a network (its packages are installed and its weights are on disk), and
`get_backbone` builds the backbone of a preset behind the `Backbone` protocol.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from mllm_missing.errors import ConfigError, DataFormatError
from mllm_missing.types import Modality

__all__ = [
    "FAMILIES",
    "QUANTIZABLE_FAMILIES",
    "Preset",
    "get_backbone",
    "get_preset",
    "list_presets",
    "preset_status",
]

PRESET_DIR = Path(__file__).with_name("presets")

#: Backbone families and the function (``module:attr``) building one from a preset.
FAMILIES: dict[str, str] = {
    "clip": "mllm_missing.backbones.clip:load_clip",
    "hf_causal": "mllm_missing.backbones.hf_towers:load_smollm2_backbone",
    "hf_encoder": "mllm_missing.backbones.hf_towers:load_minilm_backbone",
    "whisper_ct2": "mllm_missing.backbones.hf_towers:load_whisper_backbone",
    "offline_default": "mllm_missing.backbones.default:load_offline_default",
    "projector_vlm": "mllm_missing.backbones.vlm_towers:build_offline_vlm_backbone",
    "vlm": "mllm_missing.backbones.vlm_towers:load_vlm_backbone",
}
_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Preset:
    """One backbone preset (a JSON file in ``backbones/presets/``).

    Attributes:
        name: the preset name (the file name without ``.json``).
        description: one line.
        family: how it is built (a key of `FAMILIES`).
        model: model name, hub id, or the PyPI package shipping it.
        modalities: the towers it has.
        hidden_size: width of each tower's token sequence.
        dtype: default dtype.
        lora_targets: module names LoRA adapts by default.
        packages: importable modules it needs.
        pretrained: open_clip pretrained tag, if any.
        quantization: bitsandbytes quantization of the LLM's linear layers by default
            (``none``, ``int8``, ``nf4``, ``fp4``); `hf_causal` presets only.
    """

    name: str
    description: str
    family: str
    model: str
    modalities: tuple[Modality, ...]
    hidden_size: dict[Modality, int]
    dtype: str = "float32"
    lora_targets: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()
    pretrained: str | None = None
    quantization: str = "none"

    def __post_init__(self) -> None:
        where = f"preset {self.name!r}"
        if self.family not in FAMILIES:
            raise ConfigError(f"{where}: family must be one of {', '.join(FAMILIES)}")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"{where}: dtype must be one of {', '.join(_DTYPES)}")
        if set(self.hidden_size) != set(self.modalities):
            raise ConfigError(f"{where}: hidden_size needs exactly one entry per modality")
        _check_quantization(self.family, self.quantization, where)

    @classmethod
    def from_file(cls, path: Path) -> Preset:
        """Read and check a preset file; a malformed one raises naming the file and field."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataFormatError(f"{path}: not a readable JSON preset ({exc})") from None
        known = {
            "name", "description", "family", "model", "modalities", "hidden_size", "dtype",
            "lora_targets", "packages", "pretrained", "quantization",
        }  # fmt: skip
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"{path}: unknown preset field(s) {unknown}; allowed: {sorted(known)}"
            )
        try:
            modalities = tuple(Modality.parse(m) for m in data["modalities"])
            hidden = {Modality.parse(k): int(v) for k, v in data["hidden_size"].items()}
            return cls(
                name=data["name"],
                description=data["description"],
                family=data["family"],
                model=data["model"],
                modalities=modalities,
                hidden_size=hidden,
                dtype=data.get("dtype", "float32"),
                lora_targets=tuple(data.get("lora_targets", ())),
                packages=tuple(data.get("packages", ())),
                pretrained=data.get("pretrained"),
                quantization=data.get("quantization", "none"),
            )
        except KeyError as exc:
            raise ConfigError(f"{path}: preset field {exc.args[0]!r} is missing") from None
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}") from None


#: Families whose LLM `quantize_model` can quantize (their linear layers are transformers').
QUANTIZABLE_FAMILIES = ("hf_causal",)


def _check_quantization(family: str, quantization: Any, where: str) -> Any:
    """The parsed quantization config; refused for families it does not support."""
    from mllm_missing.inference.quantization import QuantizationConfig

    config = QuantizationConfig.parse(quantization)
    if config.enabled and family not in QUANTIZABLE_FAMILIES:
        raise ConfigError(
            f"{where}: quantization {config.mode!r} is supported for the "
            f"{', '.join(QUANTIZABLE_FAMILIES)} family (transformers LLMs) only, not {family!r}; "
            "CLIP, encoder and CNN towers stay in float"
        )
    return config


@cache
def _all_presets() -> dict[str, Preset]:
    presets = {}
    for path in sorted(PRESET_DIR.glob("*.json")):
        preset = Preset.from_file(path)
        if preset.name != path.stem:
            raise ConfigError(f"{path}: preset name {preset.name!r} differs from the file name")
        presets[preset.name] = preset
    return presets


def list_presets() -> list[Preset]:
    """Every shipped preset, sorted by name."""
    return list(_all_presets().values())


def get_preset(name: str) -> Preset:
    """The preset `name`; an unknown name lists the known ones."""
    presets = _all_presets()
    if name not in presets:
        raise ConfigError(f"unknown backbone preset {name!r}; known: {', '.join(presets)}")
    return presets[name]


def preset_status(preset: Preset, weights: str | Path | None = None) -> tuple[bool, str]:
    """Whether `preset` loads on this machine with no network, and why (not).

    Args:
        preset: the preset.
        weights: a local checkpoint the user would pass (for presets whose weights come from a
            hub).
    """
    missing = [p for p in preset.packages if importlib.util.find_spec(p) is None]
    if missing:
        return False, f"missing package(s): {', '.join(missing)}"
    if preset.family in ("clip", "vlm"):
        if weights is not None:
            if Path(weights).exists():
                return True, f"weights from {weights}"
            return False, f"weights not found: {weights}"
        if preset.family == "vlm" and Path(preset.model).exists():
            return True, f"weights from {preset.model}"
        source = f"pretrained tag {preset.pretrained!r}" if preset.pretrained else preset.model
        return False, f"needs {source} from a model hub; pass a local checkpoint"
    return True, "weights ship in installed packages"


def get_backbone(name: str, *, weights: str | Path | None = None, **options: Any) -> Any:
    """Build the backbone of preset `name` (see `mllm-missing backbones` for the list).

    Args:
        name: a preset name.
        weights: a local checkpoint for presets whose weights come from a hub (CLIP, VLMs).
        **options: passed to the family's loader (e.g. ``device``, ``cache_dir``);
            ``quantization`` (a mode name such as ``"nf4"``, a dict of
            `QuantizationConfig` fields, or a config) overrides the preset's.

    Raises:
        ConfigError: an unknown preset, or one that cannot load here (the message says why).
    """
    import importlib

    preset = get_preset(name)
    ok, reason = preset_status(preset, weights)
    if not ok:
        raise ConfigError(f"backbone preset {name!r} cannot load on this machine: {reason}")
    quantization = _check_quantization(
        preset.family, options.pop("quantization", preset.quantization), f"preset {name!r}"
    )
    if quantization.enabled:
        options["quantization"] = quantization
    module_name, _, attr = FAMILIES[preset.family].partition(":")
    loader = getattr(importlib.import_module(module_name), attr)
    if preset.family in ("clip", "vlm"):
        import torch

        options.setdefault("dtype", getattr(torch, preset.dtype))
    if preset.family == "clip":
        return loader(preset.model, pretrained=str(weights), **options)
    if preset.family == "vlm":
        return loader(str(weights or preset.model), **options)
    return loader(**options)
