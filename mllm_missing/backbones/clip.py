"""CLIP image and text towers through open_clip, frozen, behind the `Backbone` protocol."""

from __future__ import annotations

import copy
import difflib
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mllm_missing.backbones.base import EncoderOutput, FrozenWrapper, LayerPrompts
from mllm_missing.backbones.clip_blocks import (
    check_config,
    check_model,
    run_blocks,
    text_embed,
    text_head,
    text_tower,
    vision_embed,
    vision_head,
)
from mllm_missing.backbones.gguf import ModelNotFoundError
from mllm_missing.errors import ConfigError, MissingDependencyError
from mllm_missing.types import Modality

__all__ = ["CLIPBackbone", "load_clip"]

logger = logging.getLogger(__name__)

_INSTALL = "pip install 'mllm-missing[clip]'"
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz", ".ckpt")
_TAG_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


def _import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError as exc:
        raise MissingDependencyError(
            f"CLIP backbones need open_clip_torch ({exc}); install it with: {_INSTALL}"
        ) from exc
    return open_clip


class CLIPBackbone(FrozenWrapper):
    """A frozen open_clip CLIP with an image (ViT) and a text tower.

    Both towers run their blocks here, so `LayerPrompts` can enter any block. Without prompts
    the outputs equal open_clip's ``encode_image`` / ``encode_text``. In input mode the prompt
    positions follow the image tokens and precede the text tokens (the text tower is causal, so
    every real token sees them); they never enter pooling. Attention-mode prompts need blocks
    with a plain ``nn.MultiheadAttention`` (every built-in config); towers built with open_clip's
    custom blocks (``qk_norm``, ``scale_attn``, ...) take input-mode prompts only.

    Args:
        model: an open_clip ``CLIP`` or ``CustomTextCLIP`` with a ViT image tower and open_clip's
            own text transformer (ResNet, timm and Hugging Face towers are not supported).
        tokenizer: texts -> token ids (batch, context_length), e.g. ``open_clip.get_tokenizer``.
        name: identifier (used in cache keys and result files).
        preprocess: PIL image -> pixel tensor (3, H, W); default: open_clip's evaluation
            transform for the model's preprocessing config.

    Raises:
        ConfigError: a tower this class cannot run block by block.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        *,
        name: str,
        preprocess: Callable[[Any], torch.Tensor] | None = None,
    ):
        check_model(model, name)
        super().__init__(model)
        self.tokenizer = tokenizer
        self.name = name
        self.modalities: tuple[Modality, ...] = (Modality.IMAGE, Modality.TEXT)
        if preprocess is None:
            open_clip = _import_open_clip()
            from open_clip.transform import PreprocessCfg, image_transform_v2

            config = PreprocessCfg(**open_clip.get_model_preprocess_cfg(model))
            preprocess = image_transform_v2(config, is_train=False)
        self.preprocess = preprocess

    def _tower(self, modality: Modality | str) -> tuple[Modality, Any]:
        parsed = Modality.parse(modality)
        if parsed is Modality.IMAGE:
            return parsed, self.model.visual
        if parsed is Modality.TEXT:
            return parsed, text_tower(self.model)
        raise ConfigError(f"{self.name} has towers for image, text; got {parsed.value!r}")

    def hidden_size(self, modality: Modality) -> int:
        """Transformer width of `modality`'s tower."""
        return int(self._tower(modality)[1].transformer.width)

    def embed_dim(self, modality: Modality) -> int:
        """CLIP's joint embedding size (the projected width of `modality`'s tower)."""
        parsed, tower = self._tower(modality)
        if parsed is Modality.IMAGE:
            return int(tower.output_dim)
        projection = tower.text_projection
        if isinstance(projection, nn.Linear):
            return int(projection.out_features)
        return int(projection.shape[1]) if projection is not None else self.hidden_size(parsed)

    def num_layers(self, modality: Modality) -> int:
        """Number of transformer blocks of `modality`'s tower."""
        return len(self._tower(modality)[1].transformer.resblocks)

    def prepare(self, modality: Modality, raw: Sequence[Any]) -> dict[str, torch.Tensor]:
        """PIL images -> ``{"pixel_values"}``, or non-empty strings -> ``{"input_ids"}``.

        Raises:
            ValueError: no inputs, a non-image, or an empty text (mark the modality missing
                instead of passing a placeholder).
        """
        parsed, _ = self._tower(modality)
        if len(raw) == 0:
            raise ValueError(f"no {parsed.value} inputs to prepare")
        if parsed is Modality.IMAGE:
            from PIL import Image

            for i, image in enumerate(raw):
                if not isinstance(image, Image.Image):
                    raise ValueError(
                        f"image {i} is a {type(image).__name__}, not a PIL image; mark the image "
                        "modality missing instead of passing a placeholder"
                    )
            pixels = torch.stack([self.preprocess(image) for image in raw])
            return {"pixel_values": pixels.to(self.device)}
        for i, text in enumerate(raw):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"text {i} is empty; mark the text modality missing instead")
        return {"input_ids": self.tokenizer(list(raw)).to(self.device)}

    def encode(
        self,
        modality: Modality,
        inputs: dict[str, torch.Tensor],
        prompts: LayerPrompts | None = None,
    ) -> EncoderOutput:
        """Run `modality`'s tower block by block, inserting `prompts` at their blocks.

        Returns:
            pooled: the projected CLIP embedding; tokens: final states of the real tokens (image:
            class token then patches, after ``ln_post``; text: every position, after
            ``ln_final``); mask (text only): the non-padding positions.
        """
        parsed, tower = self._tower(modality)
        key = "pixel_values" if parsed is Modality.IMAGE else "input_ids"
        if key not in inputs:
            raise ValueError(
                f"{parsed.value} inputs need {key!r} (see prepare()); got {sorted(inputs)}"
            )
        values = inputs[key].to(self.device)
        if prompts is not None:
            prompts.validate(self.num_layers(parsed), self.hidden_size(parsed), values.shape[0])
        if parsed is Modality.IMAGE:
            x = vision_embed(tower, values.to(self.dtype))
            x = run_blocks(tower.transformer, x, None, prompts, prompts_first=False, causal=False)
            pooled, tokens = vision_head(tower, x)
            return EncoderOutput(pooled=pooled, tokens=tokens)
        x, mask = text_embed(tower, values)
        causal = tower.attn_mask is not None
        x = run_blocks(tower.transformer, x, mask, prompts, prompts_first=True, causal=causal)
        pooled, tokens = text_head(tower, x, values)
        return EncoderOutput(
            pooled=pooled, tokens=tokens, mask=values != getattr(tower, "pad_id", 0)
        )

    def embed(self, modality: Modality, raw: Sequence[Any]) -> torch.Tensor:
        """Pooled CLIP embeddings (batch, embed_dim) of raw inputs, without prompts."""
        with torch.no_grad():
            return self.encode(modality, self.prepare(modality, raw)).pooled


class _LazyTokenizer:
    """Builds the tokenizer on first use, so an image-only user never needs its files."""

    def __init__(self, build: Callable[[], Callable[[list[str]], torch.Tensor]]):
        self._build = build
        self._tokenizer: Callable[[list[str]], torch.Tensor] | None = None

    def __call__(self, texts: list[str]) -> torch.Tensor:
        if self._tokenizer is None:
            self._tokenizer = self._build()
        return self._tokenizer(texts)


def _make_tokenizer(config: Mapping[str, Any], folder: Path | None) -> Any:
    open_clip = _import_open_clip()
    text_cfg = config.get("text_cfg", {})
    context_length = int(text_cfg.get("context_length", 77))
    kwargs = dict(text_cfg.get("tokenizer_kwargs", {}))
    hf_name = text_cfg.get("hf_tokenizer_name")
    if not hf_name:
        return open_clip.SimpleTokenizer(context_length=context_length, **kwargs)
    from open_clip.tokenizer import HFTokenizer

    source = str(folder) if folder is not None else hf_name
    try:
        return HFTokenizer(
            source,
            context_length=context_length,
            tokenizer_mode=text_cfg.get("tokenizer_mode"),
            local_files_only=True,
            **kwargs,
        )
    except OSError as exc:
        raise ModelNotFoundError(
            f"the tokenizer {source!r} is not available offline ({exc}); put it in the Hugging "
            "Face cache or use model_name='local-dir:<folder>' with the tokenizer files"
        ) from exc


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    resolved = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ConfigError(f"dtype must be a floating-point torch dtype; got {dtype!r}")
    return resolved


def _folder_checkpoint(folder: Path) -> Path | None:
    found = sorted(p for p in folder.iterdir() if p.suffix in _CHECKPOINT_SUFFIXES)
    return found[0] if found else None


def _cached_tag_file(tag_cfg: Mapping[str, Any]) -> str | None:
    """The local copy of a pretrained tag's weights (HF or open_clip cache), never downloading."""
    if tag_cfg.get("file") and Path(tag_cfg["file"]).is_file():
        return str(tag_cfg["file"])
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache  # an open_clip dependency

        repo, _, filename = hub.rpartition("/")  # as open_clip: "org/repo/" or "org/repo/file"
        filename = filename or "open_clip_pytorch_model.bin"
        candidates = [filename]
        if filename.endswith((".bin", ".pth")):
            stem = "open_clip_model" if filename == "open_clip_pytorch_model.bin" else filename[:-4]
            candidates.insert(0, stem + ".safetensors")
        for candidate in candidates:
            hit = try_to_load_from_cache(repo, candidate)
            if isinstance(hit, str):
                return hit
    url = tag_cfg.get("url", "")
    if url:
        cached = Path("~/.cache/clip").expanduser() / url.rsplit("/", 1)[-1]
        if cached.is_file():
            return str(cached)
    return None


def _create(
    open_clip: Any, model_name: str, pretrained: str | Path | None
) -> tuple[nn.Module, dict[str, Any], str, Path | None, bool]:
    """Build a named model; returns (model, config, backbone name, local-dir folder, has weights)."""
    if model_name.startswith(("hf-hub:", "local-dir:")):
        if pretrained is not None:
            raise ConfigError(f"{model_name} brings its own weights; leave pretrained=None")
        if model_name.startswith("hf-hub:"):
            from huggingface_hub import try_to_load_from_cache

            repo = model_name.removeprefix("hf-hub:")
            hit = try_to_load_from_cache(repo, "open_clip_config.json")
            folder = Path(hit).parent if isinstance(hit, str) else None
            if folder is None or _folder_checkpoint(folder) is None:
                raise ModelNotFoundError(
                    f"{model_name} is not available offline (not in the Hugging Face cache); "
                    "pass a local checkpoint path or model_name='local-dir:<folder>'"
                )
        else:
            folder = Path(model_name.removeprefix("local-dir:")).expanduser()
            if not (folder / "open_clip_config.json").is_file():
                raise ModelNotFoundError(f"{folder} has no open_clip_config.json")
        config = open_clip.get_model_config(f"local-dir:{folder}")
        check_config(config, model_name)
        model = open_clip.create_model(f"local-dir:{folder}")
        return model, config, model_name, folder, _folder_checkpoint(folder) is not None

    cleaned = model_name.replace("/", "-")
    config = open_clip.get_model_config(cleaned)
    if config is None:
        close = difflib.get_close_matches(cleaned, open_clip.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"unknown open_clip model {model_name!r}{hint} (open_clip.list_models() lists them)"
        )
    check_config(config, model_name)
    if pretrained is None:
        return open_clip.create_model(cleaned), config, f"{cleaned}:untrained", None, False
    kwargs: dict[str, Any] = {}
    path = Path(pretrained).expanduser()
    if path.is_dir():
        raise ConfigError(
            f"pretrained {str(path)!r} is a folder; pass a checkpoint file, or "
            f"model_name='local-dir:{path}' for a folder with open_clip_config.json"
        )
    if not path.is_file():
        tag = str(pretrained)
        if not open_clip.is_pretrained_cfg(cleaned, tag):
            if path.suffix in _CHECKPOINT_SUFFIXES or len(path.parts) > 1:
                raise ModelNotFoundError(f"checkpoint {str(path)!r} does not exist")
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(cleaned)) or "none"
            raise ConfigError(
                f"pretrained {tag!r} is neither a checkpoint file nor an open_clip tag of "
                f"{cleaned} (tags: {tags})"
            )
        tag_cfg = open_clip.get_pretrained_cfg(cleaned, tag)
        cached = _cached_tag_file(tag_cfg)
        if cached is None:
            raise ModelNotFoundError(
                f"open_clip weights {cleaned} pretrained={tag!r} are not available offline; pass "
                "a local checkpoint path (they are in neither the Hugging Face nor the open_clip "
                "download cache)"
            )
        path = Path(cached)
        kwargs["force_preprocess_cfg"] = {
            k: tag_cfg[k] for k in _TAG_PREPROCESS_KEYS if k in tag_cfg
        }
        if tag_cfg.get("quick_gelu") and not config.get("quick_gelu"):
            kwargs["force_quick_gelu"] = True  # the activation these weights were trained with
        name = f"{cleaned}:{tag}"
    else:
        name = f"{cleaned}:{path.name}"
    return open_clip.create_model(cleaned, pretrained=str(path), **kwargs), config, name, None, True


def _build_from_config(
    open_clip: Any, name: str, model_cfg: Mapping[str, Any]
) -> tuple[nn.Module, dict[str, Any]]:
    """Build a model from a config dict (or an open_clip_config.json dict with ``model_cfg``)."""
    config = copy.deepcopy(dict(model_cfg))
    preprocess = config.pop("preprocess_cfg", {})
    config = config.get("model_cfg", config)
    check_config(config, name)
    model_class = open_clip.CustomTextCLIP if config.get("custom_text") else open_clip.CLIP
    try:
        model: nn.Module = model_class(**{k: v for k, v in config.items() if k != "custom_text"})
    except TypeError as exc:
        raise ConfigError(f"model_cfg is not a valid open_clip model config: {exc}") from None
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    defaults = PreprocessCfg(size=model.visual.image_size)  # type: ignore[union-attr]
    open_clip.set_model_preprocess_cfg(model, merge_preprocess_dict(defaults, preprocess))
    return model, config


def load_clip(
    model_name: str,
    pretrained: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    model_cfg: Mapping[str, Any] | None = None,
) -> CLIPBackbone:
    """Load an open_clip CLIP as a frozen `CLIPBackbone`; nothing is ever downloaded.

    OpenAI weights need QuickGELU: with a checkpoint file of them use the ``-quickgelu`` model
    name (e.g. ``ViT-B-16-quickgelu``); with the ``openai`` tag this is set for you.

    Args:
        model_name: an open_clip model name (``"ViT-B-16"``; see ``open_clip.list_models()``),
            ``"local-dir:<folder>"`` (open_clip_config.json + weights), or ``"hf-hub:<repo>"``
            when that repository is in the local Hugging Face cache. With `model_cfg`, any name.
        pretrained: None (random weights: a warning says the model is untrained), an open_clip
            pretrained tag (``"openai"``; only when its weights are already in the Hugging Face
            or open_clip cache), or a local checkpoint file.
        device: where to put the model.
        dtype: parameter dtype (e.g. ``torch.bfloat16`` or ``"bfloat16"``).
        model_cfg: an open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``, ...)
            to build instead of a named one, e.g. a tiny model for tests; `pretrained` may then
            be a checkpoint file.

    Raises:
        MissingDependencyError: open_clip is not installed.
        ConfigError: an unknown model name or pretrained tag, or an unsupported architecture.
        ModelNotFoundError: a checkpoint path that does not exist, or weights only a download
            would bring.
    """
    open_clip = _import_open_clip()
    resolved_dtype = _resolve_dtype(dtype)
    folder: Path | None = None
    if model_cfg is not None:
        model, config = _build_from_config(open_clip, model_name, model_cfg)
        trained = pretrained is not None
        name = model_name
        if pretrained is not None:
            path = Path(pretrained).expanduser()
            if not path.is_file():
                raise ModelNotFoundError(f"checkpoint {str(path)!r} does not exist")
            open_clip.load_checkpoint(model, str(path))
            name = f"{model_name}:{path.name}"
    else:
        model, config, name, folder, trained = _create(open_clip, model_name, pretrained)
    if not trained:
        logger.warning("%s has random weights (no checkpoint): it is untrained", model_name)
    tokenizer = _LazyTokenizer(lambda: _make_tokenizer(config, folder))
    backbone = CLIPBackbone(model, tokenizer, name=name)
    return backbone.to(device=device, dtype=resolved_dtype)
