"""The VLM family behind the `Backbone` protocol: a LLaVA-style `FrozenVLM` and the `ProjectorVLM`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mllm_missing.backbones.base import EncoderOutput, LayerPrompts, freeze
from mllm_missing.backbones.hf_prompting import PromptInjector
from mllm_missing.backbones.hf_towers import CausalLMBackbone
from mllm_missing.backbones.offline import FrozenImageEncoder
from mllm_missing.backbones.projector_vlm import ProjectorVLM
from mllm_missing.backbones.vlm import FrozenVLM
from mllm_missing.errors import ConfigError
from mllm_missing.types import Modality

__all__ = [
    "ProjectorVLMBackbone",
    "VLMBackbone",
    "build_offline_vlm_backbone",
    "load_vlm_backbone",
    "projector_vlm_backbone",
    "vlm_backbone",
]

_STRATEGIES = ("default", "full")


def _images(raw: Sequence[Any]) -> list[Any]:
    if len(raw) == 0:
        raise ValueError("no images given")
    for i, image in enumerate(raw):
        if image is None:
            raise ValueError(f"image {i} is None; mark the image modality missing")
    return list(raw)


def _part(model: Any, name: str) -> Any:
    """``model.model.<name>`` (transformers 5's LLaVA layout) or ``model.<name>`` (older ones)."""
    for owner in (getattr(model, "model", None), model):
        part = getattr(owner, name, None) if owner is not None else None
        if isinstance(part, nn.Module):
            return part
    raise ConfigError(f"{type(model).__name__} has no {name}; a LLaVA-style model is needed")


def _vision_parts(vision: Any) -> tuple[nn.ModuleList, int]:
    """The vision encoder's blocks and its number of positions (patches, plus CLS if any)."""
    inner = getattr(vision, "vision_model", vision)
    layers = getattr(getattr(inner, "encoder", None), "layers", None)
    positions = getattr(getattr(inner, "embeddings", None), "num_positions", None)
    if not isinstance(layers, nn.ModuleList) or positions is None:
        raise ConfigError(
            f"prompt insertion needs a ViT-style vision tower (encoder.layers and "
            f"embeddings.num_positions); got {type(vision).__name__}"
        )
    return layers, int(positions)


def _modality(modality: Modality | str, towers: tuple[Modality, ...], name: str) -> Modality:
    parsed = Modality.parse(modality)
    if parsed not in towers:
        raise ValueError(f"{name} has {' and '.join(m.value for m in towers)} towers only")
    return parsed


class VLMBackbone(nn.Module):
    """A LLaVA-style `FrozenVLM` as an image tower and a text tower.

    - IMAGE: the VLM's vision encoder (a ViT such as CLIP's) with prompt insertion (a
      bidirectional encoder: input-mode prompts are appended after the patches at the first
      prompted block and dropped before pooling). ``num_layers`` counts the blocks up to the
      layer LLaVA reads (``vision_feature_layer``: all of them for -1, all but the last for
      LLaVA-1.5's -2), so every block that takes prompts changes what the LM reads. Token states
      (width ``hidden_size`` = the vision hidden size) are the encoder's states at that layer for
      the positions the projector reads (CLS dropped under the ``"default"`` select strategy; with
      a list of feature layers, those of the deepest one). The pooled embedding is the mean of the
      projected image tokens, the ones the LM reads in place of the image placeholders, so
      ``embed_dim`` is the LM's hidden size; without prompts they are exactly
      `FrozenVLM.image_features`. `prepare` runs the VLM's image processor.
    - TEXT: the VLM's language model as a causal tower (`CausalLMBackbone`, text only: pooled =
      the last real token's final state).

    The VLM stays usable (`FrozenVLM.chat`, its forward): prompt insertion is a pass-through
    outside prompted calls of this backbone.

    Args:
        vlm: the frozen VLM (its attention must be ``sdpa`` or ``eager``).
        name: identifier (default: the VLM's name).
        max_length: truncate tokenized texts to this many tokens (default: no truncation).
    """

    modalities = (Modality.IMAGE, Modality.TEXT)

    def __init__(self, vlm: FrozenVLM, *, name: str | None = None, max_length: int | None = None):
        super().__init__()
        self.name = name or vlm.name
        # The text tower holds the whole VLM, so each weight has one state-dict key.
        self.text = CausalLMBackbone(vlm, name=self.name, max_length=max_length)
        config = vlm.model.config
        _part(vlm.model, "multi_modal_projector")  # fail early for a model without one
        vision = _part(vlm.model, "vision_tower")
        layers, self._positions = _vision_parts(vision)
        blocks = len(layers)
        selected = getattr(config, "vision_feature_layer", -1)
        self._feature_layers: list[int] = []
        for layer in selected if isinstance(selected, (list, tuple)) else [selected]:
            index = int(layer) + (blocks + 1 if int(layer) < 0 else 0)
            if not 0 <= index <= blocks:
                raise ConfigError(
                    f"vision_feature_layer {layer} is outside the vision tower's {blocks} blocks"
                )
            self._feature_layers.append(index)
        self._strategy = getattr(config, "vision_feature_select_strategy", "full")
        if self._strategy not in _STRATEGIES:
            raise ConfigError(
                f"vision_feature_select_strategy must be one of {', '.join(_STRATEGIES)}; "
                f"got {self._strategy!r}"
            )
        self._image_sizes = (
            int(vision.config.hidden_size),
            vlm.hidden_size,
            max(self._feature_layers),
        )
        self._injector = PromptInjector(vision.config, layers, causal=False)
        freeze(self)

    @property
    def vlm(self) -> FrozenVLM:
        """The wrapped VLM."""
        vlm = self.text.llm
        assert isinstance(vlm, FrozenVLM)
        return vlm

    # Looked up, not kept as attributes: a second reference would register the modules twice.
    @property
    def vision_tower(self) -> Any:
        """The VLM's vision encoder."""
        return _part(self.vlm.model, "vision_tower")

    @property
    def projector(self) -> Any:
        """The VLM's (frozen) multimodal projector, from vision states to LM embeddings."""
        return _part(self.vlm.model, "multi_modal_projector")

    def train(self, mode: bool = True) -> VLMBackbone:
        """Stay in eval mode whatever the caller asks (the backbone is frozen)."""
        return super().train(False)

    def hidden_size(self, modality: Modality) -> int:
        """The vision hidden size for images; the LM's hidden size for text."""
        if _modality(modality, self.modalities, self.name) is Modality.IMAGE:
            return self._image_sizes[0]
        return self.text.hidden_size(Modality.TEXT)

    def embed_dim(self, modality: Modality) -> int:
        """The LM's hidden size (images pool projected image tokens)."""
        if _modality(modality, self.modalities, self.name) is Modality.IMAGE:
            return self._image_sizes[1]
        return self.text.embed_dim(Modality.TEXT)

    def num_layers(self, modality: Modality) -> int:
        """Vision blocks up to the feature layer LLaVA reads; the LM's blocks for text."""
        if _modality(modality, self.modalities, self.name) is Modality.IMAGE:
            return self._image_sizes[2]
        return self.text.num_layers(Modality.TEXT)

    def prepare(self, modality: Modality, raw: Sequence[Any]) -> dict[str, torch.Tensor]:
        """``pixel_values`` from the VLM's image processor; token ids for text (right-padded)."""
        if _modality(modality, self.modalities, self.name) is Modality.TEXT:
            return self.text.prepare(Modality.TEXT, raw)
        processed = self.vlm.processor.image_processor(images=_images(raw), return_tensors="pt")
        return {"pixel_values": processed["pixel_values"]}

    def encode(
        self,
        modality: Modality,
        inputs: dict[str, torch.Tensor],
        prompts: LayerPrompts | None = None,
    ) -> EncoderOutput:
        """Run one tower with `prompts`; pixels are cast to the model's device and dtype."""
        if _modality(modality, self.modalities, self.name) is Modality.TEXT:
            return self.text.encode(Modality.TEXT, inputs, prompts)
        vision = self.vision_tower
        parameter = next(vision.parameters())
        pixels = inputs["pixel_values"].to(device=parameter.device, dtype=parameter.dtype)
        batch = pixels.shape[0]
        hidden, _, layers = self._image_sizes
        if prompts is not None:
            prompts.validate(layers, hidden, batch)
        real = torch.ones(batch, self._positions, dtype=torch.bool, device=pixels.device)
        with self._injector.activate(prompts, real) as call:
            output = vision(pixels, output_hidden_states=True, return_dict=True)
        states = []
        for index in self._feature_layers:
            state = self._injector.strip(call, output.hidden_states[index])
            if state.shape[1] != self._positions:
                raise RuntimeError(
                    f"the vision tower returned {state.shape[1]} positions; expected "
                    f"{self._positions} (images must have the size the image processor gives)"
                )
            states.append(state[:, 1:] if self._strategy == "default" else state)
        features = states[0] if len(states) == 1 else torch.cat(states, dim=-1)
        image_tokens = self.projector(features)
        tokens = states[self._feature_layers.index(max(self._feature_layers))]
        return EncoderOutput(pooled=image_tokens.mean(dim=1), tokens=tokens)

    @torch.no_grad()
    def embed(self, modality: Modality, raw: Sequence[Any]) -> torch.Tensor:
        """Pooled embeddings (batch, embed_dim) of raw inputs, without prompts."""
        return self.encode(modality, self.prepare(modality, raw)).pooled


class ProjectorVLMBackbone(nn.Module):
    """A `ProjectorVLM`'s frozen parts as an image tower and a text tower.

    The projector is trainable and belongs to the method, not to the frozen backbone: it is
    left out (the backbone holds the image encoder and the LM only, all frozen).

    - IMAGE: the frozen image encoder, with no transformer blocks (``num_layers`` 0: prompts
      cannot be inserted). The EfficientNet `FrozenImageEncoder` works as in the offline default
      stack: `prepare` gives its pixels, token states are the final feature map's cells and the
      pooled embedding their mean, the encoder's own features (width 1280 for both). Any other
      encoder (``dim`` and ``encode(images)``) has its features computed in `prepare`
      (``image_features``); they are the pooled embedding and the one token.
    - TEXT: the frozen LM as a causal tower (`CausalLMBackbone`).

    Args:
        vlm: the composed VLM (it needs an image encoder).
        name: identifier (default: ``"<encoder name>+<LM name>"``).
        max_length: truncate tokenized texts to this many tokens (default: no truncation).

    Raises:
        ConfigError: the VLM has no image encoder (use `CausalLMBackbone` on ``vlm.lm``).
    """

    modalities = (Modality.IMAGE, Modality.TEXT)

    def __init__(
        self, vlm: ProjectorVLM, *, name: str | None = None, max_length: int | None = None
    ):
        super().__init__()
        encoder = vlm.image_encoder
        if encoder is None:
            raise ConfigError(
                "the ProjectorVLM has no image encoder; for its text tower alone use "
                "CausalLMBackbone(vlm.lm)"
            )
        self.name = name or f"{getattr(encoder, 'name', type(encoder).__name__)}+{vlm.lm.name}"
        self.image_encoder: Any = encoder
        self.text = CausalLMBackbone(vlm.lm, max_length=max_length)
        self.image_dim = int(encoder.dim)
        freeze(self)

    def train(self, mode: bool = True) -> ProjectorVLMBackbone:
        """Stay in eval mode whatever the caller asks (the backbone is frozen)."""
        return super().train(False)

    def hidden_size(self, modality: Modality) -> int:
        """The encoder's feature width for images; the LM's hidden size for text."""
        if _modality(modality, self.modalities, self.name) is Modality.IMAGE:
            return self.image_dim
        return self.text.hidden_size(Modality.TEXT)

    def embed_dim(self, modality: Modality) -> int:
        """The encoder's feature width for images; the LM's hidden size for text."""
        if _modality(modality, self.modalities, self.name) is Modality.IMAGE:
            return self.image_dim
        return self.text.embed_dim(Modality.TEXT)

    def num_layers(self, modality: Modality) -> int:
        """0 for the image encoder (no prompt insertion); the LM's block count for text."""
        if _modality(modality, self.modalities, self.name) is Modality.IMAGE:
            return 0
        return self.text.num_layers(Modality.TEXT)

    def prepare(self, modality: Modality, raw: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Pixels (EfficientNet) or precomputed ``image_features`` for images; token ids for text."""
        if _modality(modality, self.modalities, self.name) is Modality.TEXT:
            return self.text.prepare(Modality.TEXT, raw)
        images = _images(raw)
        if isinstance(self.image_encoder, FrozenImageEncoder):
            return {"pixel_values": self.image_encoder.preprocess(images)}
        # The encoder may run under inference_mode; a clone is an ordinary tensor.
        return {"image_features": self.image_encoder.encode(images).clone()}

    def encode(
        self,
        modality: Modality,
        inputs: dict[str, torch.Tensor],
        prompts: LayerPrompts | None = None,
    ) -> EncoderOutput:
        """Run one tower; prompts are refused for the image tower (it has no blocks)."""
        if _modality(modality, self.modalities, self.name) is Modality.TEXT:
            return self.text.encode(Modality.TEXT, inputs, prompts)
        if prompts is not None:
            raise ValueError("the image encoder of a ProjectorVLM has no blocks for prompts")
        encoder = self.image_encoder
        parameter = next(encoder.parameters(), None) if isinstance(encoder, nn.Module) else None
        key = "image_features" if "image_features" in inputs else "pixel_values"
        tensor = inputs[key]
        if parameter is not None:
            tensor = tensor.to(device=parameter.device, dtype=parameter.dtype)
        if key == "image_features":
            return EncoderOutput(pooled=tensor, tokens=tensor[:, None])
        feature_map = encoder.network.extract_features(tensor)
        tokens = feature_map.flatten(2).transpose(1, 2)
        return EncoderOutput(pooled=tokens.mean(dim=1), tokens=tokens)

    @torch.no_grad()
    def embed(self, modality: Modality, raw: Sequence[Any]) -> torch.Tensor:
        """Pooled embeddings (batch, embed_dim) of raw inputs, without prompts."""
        return self.encode(modality, self.prepare(modality, raw)).pooled


def vlm_backbone(vlm: FrozenVLM) -> VLMBackbone:
    """`vlm` behind the Backbone protocol (see `VLMBackbone`)."""
    return VLMBackbone(vlm)


def projector_vlm_backbone(vlm: ProjectorVLM) -> ProjectorVLMBackbone:
    """The frozen parts of `vlm` behind the Backbone protocol (see `ProjectorVLMBackbone`)."""
    return ProjectorVLMBackbone(vlm)


def load_vlm_backbone(
    path: str | Path,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    name: str | None = None,
    max_length: int | None = None,
) -> VLMBackbone:
    """Load a local LLaVA-style checkpoint folder (see `load_vlm`) as a `VLMBackbone`.

    Args:
        path: the checkpoint folder.
        dtype: parameter dtype.
        device: where to put the model.
        name: the backbone's name (default: the folder name, lower-cased).
        max_length: truncate tokenized texts to this many tokens.

    Raises:
        ModelNotFoundError: the path does not exist locally.
        ConfigError: not a vision-language checkpoint, or its attention implementation
            does not support prompt insertion (load with ``sdpa`` or ``eager``).
    """
    from mllm_missing.backbones.vlm import load_vlm

    vlm = load_vlm(path, dtype=dtype, device=device, name=name)
    return VLMBackbone(vlm, max_length=max_length)


def build_offline_vlm_backbone(
    cache_dir: str | Path | None = None,
    *,
    image_size: int = 224,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    max_length: int | None = None,
) -> ProjectorVLMBackbone:
    """EfficientNet-Lite0 + SmolLM2-135M-Instruct (see `build_offline_vlm`) as a backbone.

    Args:
        cache_dir: the cache root for the converted SmolLM2 copy (see `load_smollm2`).
        image_size: the encoder's input resolution.
        dtype: the LM's parameter dtype.
        device: where to put the models.
        max_length: truncate tokenized texts to this many tokens.
    """
    from mllm_missing.backbones.projector_vlm import build_offline_vlm

    vlm = build_offline_vlm(cache_dir, image_size=image_size, dtype=dtype, device=device)
    return ProjectorVLMBackbone(vlm, max_length=max_length)
