"""Frozen LLaVA-style vision-language models loaded through transformers from a local folder.

`FrozenVLM` keeps the whole model frozen (eval mode, no parameter requires grad) while letting
gradients flow to ``inputs_embeds`` and ``pixel_values``, so soft prompts can sit in front of
it. It chats with or without an image: with none, the prompt is rendered with no image
placeholder and the model runs text-only, which is the missing-image case.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mllm_missing.backbones.base import FrozenWrapper
from mllm_missing.backbones.gguf import ModelNotFoundError, _resolve_dtype
from mllm_missing.backbones.hf import pad_token_id, stop_token_ids
from mllm_missing.errors import ConfigError

__all__ = ["FrozenVLM", "ModelNotFoundError", "load_vlm"]

logger = logging.getLogger(__name__)

VLMMessages = str | Sequence[dict[str, Any]]
"""A chat: ``{"role", "content"}`` dicts whose content is a str or a list of typed items
(``{"type": "text", "text": ...}``, ``{"type": "image"}``), or a str taken as one user message."""


def _as_content_list(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, Sequence):
        items = [dict(item) for item in content]
        if all("type" in item for item in items):
            return items
    raise ValueError(f"message content must be a str or a list of typed items; got {content!r}")


def _with_image_slots(messages: VLMMessages, num_images: int) -> list[dict[str, Any]]:
    """Messages with list content and exactly `num_images` image items.

    Image items already in the chat are kept where they are; with none, the images go at the
    start of the first user message (LLaVA's layout).
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    chat = [{**message, "content": _as_content_list(message["content"])} for message in messages]
    slots = sum(item["type"] == "image" for message in chat for item in message["content"])
    if slots == 0 and num_images:
        first_user = next((m for m in chat if m.get("role") == "user"), None)
        if first_user is None:
            raise ValueError("the chat has no user message to attach the image to")
        first_user["content"] = [{"type": "image"}] * num_images + first_user["content"]
    elif slots != num_images:
        raise ValueError(f"the chat has {slots} image placeholders but {num_images} images")
    return chat


def _as_images(images: Any) -> list[Any]:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        if any(image is None for image in images):
            raise ValueError("an image in the list is None; leave missing images out of the list")
        return list(images)
    return [images]


class FrozenVLM(FrozenWrapper):
    """A frozen LLaVA-style transformers vision-language model and its processor.

    Args:
        model: a transformers image-text-to-text model with ``get_image_features``
            (e.g. ``LlavaForConditionalGeneration``).
        processor: its processor (tokenizer + image processor, with a chat template).
        name: identifier used in logs and cache keys.
        source: the folder the weights were loaded from.
    """

    def __init__(self, model: Any, processor: Any, name: str, source: Path | None = None):
        super().__init__(model)
        self.processor: Any = processor
        self.name = name
        self.source = source
        text_config = model.config.get_text_config()
        self.hidden_size = int(text_config.hidden_size)
        self.num_layers = int(text_config.num_hidden_layers)

    @property
    def tokenizer(self) -> Any:
        """The processor's tokenizer."""
        return self.processor.tokenizer

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings (batch, seq, hidden) of `input_ids`, to concatenate with soft prompts."""
        embeddings: torch.Tensor = self.model.get_input_embeddings()(input_ids.to(self.device))
        return embeddings

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The projected image tokens (batch, N, hidden) the language model reads for each image.

        They replace the N image placeholder tokens of the prompt, in order.
        """
        config = self.model.config
        options = {
            key: getattr(config, key)
            for key in ("vision_feature_layer", "vision_feature_select_strategy")
            if hasattr(config, key)
        }
        output = self.model.get_image_features(pixel_values=self._pixels(pixel_values), **options)
        # transformers 5 returns a model output whose pooler_output is a list of (N, hidden)
        # tensors; older versions return the (batch, N, hidden) tensor itself.
        features = getattr(output, "pooler_output", output)
        if isinstance(features, (list, tuple)):
            features = torch.stack(list(features))
        result: torch.Tensor = features
        return result

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token logits (batch, seq, vocab) from `input_ids` or `inputs_embeds` (exactly one).

        With `pixel_values`, the image tokens replace the image placeholder positions (found by
        token id, or in `inputs_embeds` by the placeholder's embedding); the sequence must hold
        one placeholder per image token. Gradients flow back to `inputs_embeds` (and to
        `pixel_values`) although the model's weights are frozen.
        """
        if (inputs_embeds is None) == (input_ids is None):
            raise ValueError("pass exactly one of inputs_embeds and input_ids")
        output = self.model(
            input_ids=None if input_ids is None else input_ids.to(self.device),
            inputs_embeds=inputs_embeds,
            pixel_values=None if pixel_values is None else self._pixels(pixel_values),
            attention_mask=None if attention_mask is None else attention_mask.to(self.device),
            use_cache=False,
        )
        logits: torch.Tensor = output.logits
        return logits

    def chat_text(self, messages: VLMMessages, num_images: int = 0) -> str:
        """The chat rendered by the chat template, with `num_images` image placeholders.

        Raises:
            ConfigError: neither the processor nor its tokenizer has a chat template.
            ValueError: the chat's own image items do not match `num_images`.
        """
        chat = _with_image_slots(messages, num_images)
        template = getattr(self.processor, "chat_template", None) or getattr(
            self.tokenizer, "chat_template", None
        )
        if not template:
            raise ConfigError(
                f"the processor of {self.name} has no chat template; set processor.chat_template"
            )
        text: str = self.tokenizer.apply_chat_template(
            chat, chat_template=template, tokenize=False, add_generation_prompt=True
        )
        return text

    @torch.inference_mode()
    def chat(self, messages: VLMMessages, images: Any = None, max_new_tokens: int = 64) -> str:
        """Greedy-decode the assistant's answer to `messages` about `images`.

        Args:
            messages: the chat, or a str taken as one user message. Image items
                (``{"type": "image"}``) in the content mark where images go; without them the
                images go at the start of the first user message.
            images: a PIL image, a list of them, or None: with no image the chat runs text-only
                (no placeholder is rendered), the missing-image case.
            max_new_tokens: the most tokens generated.

        Returns:
            The answer, without special tokens.
        """
        from transformers import GenerationConfig

        image_list = _as_images(images)
        text = self.chat_text(messages, num_images=len(image_list))
        # As transformers' processors do: the tokenizer adds its special tokens (LLaVA's BOS)
        # unless the rendered template already starts with them.
        bos = self.tokenizer.bos_token
        inputs = self.processor(
            text=[text],
            images=image_list or None,
            return_tensors="pt",
            add_special_tokens=not (bos and text.startswith(bos)),
        )
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self._stop_ids(),
            pad_token_id=self._pad_id(),
        )
        output = self.model.generate(**inputs, generation_config=config)
        prompt_length = inputs["input_ids"].shape[1]
        answer: str = self.tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True)
        return answer

    def _pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values.to(device=self.device, dtype=self.dtype)

    def _stop_ids(self) -> list[int]:
        return stop_token_ids(self.model, self.tokenizer)

    def _pad_id(self) -> int:
        return pad_token_id(self.tokenizer)


def _read_model(folder: Path, dtype: torch.dtype) -> Any:
    """The image-text-to-text model in `folder` (AutoModel first, then LLaVA's own class)."""
    import transformers

    loader = getattr(transformers, "AutoModelForImageTextToText", None)
    if loader is not None:
        try:
            return loader.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
        except ValueError as exc:  # a config class this transformers maps to no such model
            logger.info(
                "AutoModelForImageTextToText cannot load %s (%s); trying LLaVA", folder, exc
            )
    return transformers.LlavaForConditionalGeneration.from_pretrained(
        str(folder), dtype=dtype, local_files_only=True
    )


def load_vlm(
    path: str | Path,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    name: str | None = None,
) -> FrozenVLM:
    """Load a local LLaVA-style checkpoint folder (model + processor) as a `FrozenVLM`.

    Nothing is downloaded: a hub id that is not a local path fails at once.

    Args:
        path: the checkpoint folder (``config.json`` with a ``vision_config``, weights, and the
            processor's files).
        dtype: parameter dtype (e.g. ``torch.bfloat16`` or ``"bfloat16"``).
        device: where to put the model.
        name: the model's name (default: the folder name, lower-cased).

    Raises:
        ModelNotFoundError: the path does not exist locally.
        ConfigError: the folder is not a vision-language checkpoint (no vision config, or no
            image processor), or `dtype` is not a floating dtype.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never let the hub client try the network
    resolved = _resolve_dtype(dtype)
    folder = Path(path)
    if not folder.exists():
        raise ModelNotFoundError(
            f"model {str(path)!r} not found locally; this machine cannot download from a hub: "
            "pass a local checkpoint folder"
        )
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{config_path}: not a readable checkpoint config ({exc})") from exc
    if not isinstance(config, dict) or "vision_config" not in config:
        raise ConfigError(f"{folder} is not a vision-language checkpoint: no vision_config")
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
    if getattr(processor, "image_processor", None) is None:
        raise ConfigError(f"{folder} has no image processor (processor_config.json is missing)")
    model = _read_model(folder, resolved)
    if model.dtype != resolved:
        model.to(resolved)
    wrapper = FrozenVLM(model, processor, name=name or folder.resolve().name.lower(), source=folder)
    return wrapper.to(device)
