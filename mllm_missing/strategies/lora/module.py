"""LoRA adapters injected by peft into a frozen backbone's towers: one shared, or one per missing case.

peft wraps the targeted linear layers of the backbone in place (the base weights stay frozen and
untouched); this module keeps only the adapter weights as its own submodules, so its
`state_dict` and `parameters` are the LoRA weights alone. With ``routed`` there is one adapter per
missing case (`case_names`: ``image``, ``text``, ``image+text`` for two modalities) and `encode`
runs each case's rows through that case's adapter (MoRA-style routing by the presence mask).

On disk the adapters follow peft's layout: ``adapter_config.json`` + ``adapter_model.safetensors``
with the keys `PeftModel.save_pretrained` writes for the backbone's inner model (e.g.
``base_model.model.visual.transformer.resblocks.0.attn.out_proj.lora_A.weight``); the shared
adapter is peft's ``default`` at the top of the folder, a routed strategy writes each case's
adapter into a subfolder named after the case (``image/``, ``text/``, ``image+text/``), as peft
does for non-default adapters. `PeftModel.from_pretrained(backbone.model, folder)` reads them.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mllm_missing.backbones.base import Backbone, EncoderOutput
from mllm_missing.errors import ConfigError
from mllm_missing.strategies.base import Strategy, case_codes, case_names
from mllm_missing.strategies.lora.config import LoraStrategyConfig
from mllm_missing.types import Modality

__all__ = ["DEFAULT_TARGETS", "LoraStrategy", "default_target_modules"]

#: Backbone family -> (module names that identify it, its default LoRA targets), checked in order.
DEFAULT_TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "open_clip": (("c_fc", "c_proj"), ("out_proj", "c_fc", "c_proj")),
    "llama": (("q_proj", "o_proj"), ("q_proj", "k_proj", "v_proj", "o_proj")),
    "whisper": (("q_proj", "out_proj"), ("q_proj", "k_proj", "v_proj", "out_proj")),
    "bert": (("query", "key", "value"), ("query", "key", "value", "dense")),
}
_DEFAULT_ADAPTER = "default"  # peft's name for the adapter saved at the top of the folder
_PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before the model's keys
_CONFIG_FILE, _WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def _peft_root(backbone: Any, modality: Modality) -> tuple[Any, Any] | None:
    """(the inner model peft injects into, the tower's transformer inside it), None if unknown."""
    from mllm_missing.backbones.clip import CLIPBackbone
    from mllm_missing.backbones.clip_blocks import text_tower
    from mllm_missing.backbones.default import OfflineDefaultBackbone
    from mllm_missing.backbones.hf_towers import (
        CausalLMBackbone,
        SentenceEncoderBackbone,
        WhisperEncoderBackbone,
    )

    if isinstance(backbone, OfflineDefaultBackbone):
        # The CNN image tower has no linear blocks worth adapting; the MiniLM tower does.
        return _peft_root(backbone.text, modality) if modality is Modality.TEXT else None
    if isinstance(backbone, CLIPBackbone):
        root = backbone.model
        if modality is Modality.IMAGE:
            return root, root.visual.transformer
        if modality is Modality.TEXT:
            return root, text_tower(root).transformer
        return None
    if isinstance(backbone, CausalLMBackbone):
        return backbone.llm.model, backbone.llm.model.get_decoder()
    if isinstance(backbone, SentenceEncoderBackbone):
        return backbone.model, backbone.model.encoder
    if isinstance(backbone, WhisperEncoderBackbone):
        return backbone.audio.encoder, backbone.audio.encoder
    return None


def _is_adaptable(module: nn.Module) -> bool:
    linear = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d)
    return isinstance(module, linear) or type(module).__name__ == "Conv1D"


def _layers(tower: nn.Module) -> dict[str, nn.Module]:
    """The tower's linear-like layers by their name inside it."""
    return {name: m for name, m in tower.named_modules() if name and _is_adaptable(m)}


def _short_names(names: Sequence[str]) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name in names})


def default_target_modules(names: Sequence[str]) -> tuple[str, ...]:
    """The default targets of the family whose module names appear in `names` (empty: none)."""
    present = set(_short_names(names))
    for markers, targets in DEFAULT_TARGETS.values():
        if present.issuperset(markers):
            return targets
    return ()


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


class LoraStrategy(Strategy):
    """LoRA (peft) on the linear layers of the towers it acts on; optionally routed per case.

    The adapters are injected into the backbone in place: a backbone carries at most one LoRA
    strategy, and its direct `Backbone.encode` calls see the shared adapter (routed: the
    complete case's). The backbone's own weights stay frozen.

    Args:
        config: the strategy's config.
        backbone: the frozen backbone (modified in place: its target layers get LoRA wrappers).
        modalities: the dataset's modalities (the routed cases are built over these).

    QLoRA: on a backbone whose LLM was quantized with bitsandbytes (``get_backbone(...,
    quantization="nf4")``), the adapters wrap the 4-bit or 8-bit layers (peft's bnb LoRA
    layers). peft's ``prepare_model_for_kbit_training`` first casts the LLM's remaining 16-bit
    parameters (norms, embeddings) to float32 for stable gradients; peft creates the adapter
    weights in the 4-bit layers' ``compute_dtype`` (float32 weights for int8), and the frozen
    quantized matmuls run in that dtype, on the CPU through bitsandbytes' differentiable kernels
    (`enable_training_kernels`). Shared and routed adapters both work on a quantized base.

    Raises:
        ConfigError: no tower has the target modules (the message lists the modules found), a
            listed tower has none, the backbone already carries LoRA layers, or it mixes
            bitsandbytes layers into a tower that is not a transformers model (QLoRA is
            supported on transformers LLMs only).
    """

    config: LoraStrategyConfig

    def __init__(
        self, config: LoraStrategyConfig, backbone: Backbone, modalities: Sequence[Modality]
    ) -> None:
        super().__init__(config, backbone, modalities)
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.uses_presence = config.routed
        self.cases = case_names(self.data_modalities)
        self.adapter_names = list(self.cases) if config.routed else [_DEFAULT_ADAPTER]
        roots = {m: _peft_root(backbone, m) for m in self.towers}
        unsupported = [m.value for m, r in roots.items() if r is None]
        listed = {Modality.parse(m) for m in config.modalities}
        for m in listed - set(self.towers):
            unsupported.append(m.value)
        if unsupported and (listed or len(unsupported) == len(roots)):
            raise ConfigError(
                f"strategy.modalities: lora cannot reach the {', '.join(unsupported)} tower of "
                f"{backbone.name!r} ({type(backbone).__name__})"
            )
        found = {m: r for m, r in roots.items() if r is not None}
        if not found:
            raise ConfigError(f"lora: {backbone.name!r} has no tower it can adapt")
        root = next(iter(found.values()))[0]
        self._root = [root]  # a list, so the backbone is not registered as a submodule
        paths = {id(module): name for name, module in root.named_modules()}
        if any(isinstance(module, BaseTunerLayer) for module in root.modules()):
            raise ConfigError(
                f"lora: {backbone.name!r} already carries peft adapter layers (one LoRA strategy "
                "per backbone); build a fresh backbone"
            )

        targeted: dict[Modality, list[str]] = {}
        patterns: list[str] = []
        empty: list[str] = []
        for modality, (_, tower) in found.items():
            prefix = paths[id(tower)]
            layers = _layers(tower)
            targets = config.target_modules or default_target_modules(list(layers))
            names = [n for n in layers if any(_matches(n, t) for t in targets)]
            if not names:
                empty.append(
                    f"the {modality.value} tower has no module named "
                    f"{', '.join(targets) or '(no default for this family)'}; its linear modules "
                    f"are {', '.join(_short_names(list(layers))) or 'none'}"
                )
                continue
            full = [f"{prefix}.{n}" if prefix else n for n in names]
            targeted[modality] = full
            head = re.escape(prefix) + r"\." if prefix else ""
            alternatives = "|".join(re.escape(t) for t in targets)
            patterns.append(f"{head}(?:.*\\.)?(?:{alternatives})")
        if empty and (listed or not targeted):
            raise ConfigError(f"strategy.target_modules: on {backbone.name!r}, " + "; ".join(empty))
        if config.target_modules:
            every = [n for names in targeted.values() for n in names]
            unused = [t for t in config.target_modules if not any(_matches(n, t) for n in every)]
            if unused:
                raise ConfigError(
                    f"strategy.target_modules: {', '.join(unused)} match no module of the "
                    f"adapted towers of {backbone.name!r}"
                )
        self.towers = tuple(m for m in self.towers if m in targeted)
        self.targeted = targeted
        self.quantized = _prepare_quantized(root, backbone.name)
        self.peft_config = LoraConfig(
            r=config.r,
            lora_alpha=config.alpha,  # type: ignore[arg-type]  # peft annotates int, takes float
            lora_dropout=config.dropout,
            target_modules="^(?:" + "|".join(patterns) + ")$",
            init_lora_weights=True,  # B = 0: a no-op at start for init normal and zero alike
        )
        with warnings.catch_warnings():
            # peft warns when a second adapter joins a model: routing is exactly that.
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            for name in self.adapter_names:
                inject_adapter_in_model(self.peft_config, root, adapter_name=name)

        wanted = {n for names in targeted.values() for n in names}
        injected_layers = [(n, m) for n, m in root.named_modules() if isinstance(m, LoraLayer)]
        injected = {n for n, _ in injected_layers}
        if injected != wanted:  # the regex and our own matching must agree
            raise RuntimeError(f"lora: peft adapted {sorted(injected ^ wanted)} unexpectedly")
        self._lora_layers: list[Any] = [m for _, m in injected_layers]
        self.adapters = nn.ModuleList(
            nn.ModuleDict({"lora_A": m.lora_A, "lora_B": m.lora_B, "lora_dropout": m.lora_dropout})
            for _, m in injected_layers
        )
        for parameter in self.adapters.parameters():
            parameter.requires_grad_(True)
        self._activate(self.adapter_names[-1])

    def _activate(self, adapter: str) -> None:
        # peft's set_adapter would also switch off requires_grad of the other cases' adapters,
        # which must keep training: set the active adapter alone.
        for layer in self._lora_layers:
            layer._active_adapter = [adapter]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The LoRA weights (every case's when routed)."""
        return list(self.adapters.parameters())

    def encode(
        self,
        backbone: Backbone,
        modality: Modality,
        inputs: dict[str, torch.Tensor],
        presence: torch.Tensor,
        context: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """Run `modality`'s tower with LoRA; routed: each case's rows through its own adapter."""
        del context
        modality = Modality.parse(modality)
        if not self.adapts(modality):
            return backbone.encode(modality, inputs)
        for adapter in self.adapters:
            adapter["lora_dropout"].train(self.training)  # type: ignore[index]  # the frozen backbone forces eval
        if not self.config.routed:
            return backbone.encode(modality, inputs)
        codes = case_codes(presence, self.data_modalities)
        parts: list[EncoderOutput] = []
        order: list[torch.Tensor] = []
        try:
            for code in codes.unique().tolist():
                rows = (codes == code).nonzero().flatten()
                self._activate(self.cases[int(code)])
                parts.append(backbone.encode(modality, _take_rows(inputs, rows, len(codes))))
                order.append(rows)
        finally:
            self._activate(self.adapter_names[-1])
        if len(parts) == 1:
            return parts[0]
        inverse = torch.argsort(torch.cat(order))

        def stitch(tensors: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat(tensors)[inverse.to(tensors[0].device)]

        masks = [p.mask for p in parts if p.mask is not None]
        return EncoderOutput(
            pooled=stitch([p.pooled for p in parts]),
            tokens=stitch([p.tokens for p in parts]),
            mask=stitch(masks) if len(masks) == len(parts) else None,
        )

    def _folder(self, directory: Path, adapter: str) -> Path:
        return directory if adapter == _DEFAULT_ADAPTER else directory / adapter

    def save_files(self, directory: Any) -> None:
        """Write each adapter in peft's layout (routed: one subfolder per case)."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        for adapter in self.adapter_names:
            folder = self._folder(Path(directory), adapter)
            folder.mkdir(parents=True, exist_ok=True)
            self.peft_config.save_pretrained(str(folder))
            state = get_peft_model_state_dict(self._root[0], adapter_name=adapter)
            state = {_PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in state.items()}
            save_file(state, str(folder / _WEIGHTS_FILE), metadata={"format": "pt"})

    def load_files(self, directory: Any) -> None:
        """Read the adapters written by `save_files`; the files must match this config.

        Raises:
            FileNotFoundError: an adapter's config or weights file is missing (named).
            ValueError: the saved rank or targets differ from this strategy's, or keys are missing.
        """
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        for adapter in self.adapter_names:
            folder = self._folder(Path(directory), adapter)
            for file in (_CONFIG_FILE, _WEIGHTS_FILE):
                if not (folder / file).is_file():
                    raise FileNotFoundError(f"{folder / file}: no LoRA adapter {adapter!r} file")
            saved = json.loads((folder / _CONFIG_FILE).read_text(encoding="utf-8"))
            for key in ("r", "target_modules"):
                if saved.get(key) != getattr(self.peft_config, key):
                    raise ValueError(
                        f"{folder / _CONFIG_FILE}: {key} is {saved.get(key)!r}; this strategy "
                        f"has {getattr(self.peft_config, key)!r}"
                    )
            state = load_file(str(folder / _WEIGHTS_FILE))
            state = {k.removeprefix(_PEFT_PREFIX): v for k, v in state.items()}
            result: Any = set_peft_model_state_dict(self._root[0], state, adapter_name=adapter)
            missing = [k for k in result.missing_keys if "lora_" in k and f".{adapter}." in k]
            unexpected = [k for k in result.unexpected_keys if "lora_" in k]
            if missing or unexpected:
                raise ValueError(
                    f"{folder / _WEIGHTS_FILE}: missing {missing[:3]}, unexpected {unexpected[:3]}"
                )


def _prepare_quantized(root: nn.Module, name: str) -> bool:
    """Prepare a bitsandbytes-quantized transformers model for LoRA training (QLoRA); False if
    `root` is not quantized."""
    from mllm_missing.inference.quantization import quantized_layers

    if not quantized_layers(root):
        return False
    if not hasattr(root, "config") or not hasattr(root, "get_input_embeddings"):
        raise ConfigError(
            f"lora: {name!r} has bitsandbytes layers in a model that is not a transformers "
            "model; QLoRA is supported on quantized transformers LLMs only"
        )
    from peft import prepare_model_for_kbit_training

    from mllm_missing.inference.quantization import enable_training_kernels

    was_training = root.training
    prepare_model_for_kbit_training(root, use_gradient_checkpointing=False)
    enable_training_kernels(root)  # else a frozen 4-bit base passes no gradient on the CPU
    root.train(was_training)
    return True


def _take_rows(
    inputs: dict[str, torch.Tensor], rows: torch.Tensor, batch: int
) -> dict[str, torch.Tensor]:
    """Every tensor of `inputs` at `rows` (dim 0); each must have one row per sample."""
    taken = {}
    for key, value in inputs.items():
        if value.ndim == 0 or value.shape[0] != batch:
            raise ValueError(
                f"routed lora needs one row per sample in every input; {key!r} has shape "
                f"{tuple(value.shape)} for {batch} samples"
            )
        taken[key] = value.index_select(0, rows.to(value.device))
    return taken
