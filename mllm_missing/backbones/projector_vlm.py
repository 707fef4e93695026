"""A tiny composed LLaVA: frozen image encoder -> trainable projector -> frozen causal LM.

`ProjectorVLM` maps an image's pooled features (from any frozen encoder with ``.dim`` and
``encode(images)``) through a 2-layer MLP to ``num_image_tokens`` vectors in the LM's embedding
space, and splices them into the chat prompt as ``inputs_embeds``.

Where the image tokens go: at the image marker (`IMAGE_MARKER`, ``"<image>"``) in the rendered
chat template. A prompt without the marker gets ``"<image>\\n"`` put at the start of its last user
message (LLaVA's layout), so with SmolLM2 the tokens sit right after the user-turn header
``<|im_start|>user\\n`` and before the question. The text before and after the marker is
tokenized separately and the image tokens go between.

A missing image inserts nothing: the marker (and the newline after it) is removed, so the
prompt is exactly the LM's text-only chat prompt. A later missing-aware prompt can put its own
tokens at that position by calling `ProjectorVLM.build_inputs` with them instead of None.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mllm_missing.backbones.base import freeze
from mllm_missing.backbones.hf import (
    CallbackStreamer,
    FrozenCausalLM,
    Messages,
    pad_token_id,
    stop_token_ids,
)
from mllm_missing.backbones.image_projector import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ImageEncoder,
    ImageInput,
    ImageProjector,
    collect_image_features,
    read_projector_files,
    write_projector_files,
)
from mllm_missing.errors import ConfigError

# The projector's parts live in image_projector; they are importable from here as before.
__all__ = [
    "CONFIG_FILE",
    "IMAGE_MARKER",
    "WEIGHTS_FILE",
    "ImageEncoder",
    "ImageInput",
    "ImageProjector",
    "ProjectorVLM",
    "ProjectorVLMOutput",
    "build_offline_vlm",
]

IMAGE_MARKER = "<image>"
IGNORE_INDEX = -100


@dataclass
class ProjectorVLMOutput:
    """What `ProjectorVLM.forward` returns.

    Attributes:
        logits: (batch, seq, vocab) next-token logits; rows are right-padded.
        attention_mask: (batch, seq) 1 on real positions.
        labels: (batch, seq) the answer token at each answer position, ``-100`` elsewhere
            (the logits at position ``t - 1`` predict ``labels[:, t]``); None without answers.
        loss: mean cross-entropy over all answer tokens of the batch; None without answers.
    """

    logits: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None = None
    loss: torch.Tensor | None = None


class ProjectorVLM(nn.Module):
    """Frozen image encoder + trainable `ImageProjector` + frozen `FrozenCausalLM`.

    Args:
        lm: the frozen causal LM (its tokenizer needs a chat template).
        image_encoder: a frozen encoder with ``.dim`` and ``encode(images)``; may be None when
            only precomputed features are given (then pass `image_dim`).
        image_dim: width of the image features (default: ``image_encoder.dim``).
        num_image_tokens: image tokens spliced into the prompt per image.
        projector_dim: width of the projector's middle layer (default: the LM's hidden size).
        marker: the string that marks the image position in a prompt (see the module docstring).
    """

    def __init__(
        self,
        lm: FrozenCausalLM,
        image_encoder: ImageEncoder | None = None,
        *,
        image_dim: int | None = None,
        num_image_tokens: int = 4,
        projector_dim: int | None = None,
        marker: str = IMAGE_MARKER,
    ):
        super().__init__()
        if image_dim is None:
            if image_encoder is None:
                raise ConfigError("image_dim is needed when no image_encoder is given")
            image_dim = int(image_encoder.dim)
        elif image_encoder is not None and int(image_encoder.dim) != image_dim:
            raise ConfigError(f"image_dim {image_dim} != image_encoder.dim {image_encoder.dim}")
        if not marker:
            raise ConfigError("marker must be a non-empty string")
        self.lm = lm
        self.image_encoder = image_encoder
        if isinstance(image_encoder, nn.Module):
            freeze(image_encoder)
        self.marker = marker
        self.projector = ImageProjector(image_dim, lm.hidden_size, num_image_tokens, projector_dim)
        self.projector.to(lm.device)

    @property
    def num_image_tokens(self) -> int:
        """Image tokens inserted per present image."""
        return self.projector.num_image_tokens

    def train(self, mode: bool = True) -> ProjectorVLM:
        """Train mode for the projector; the frozen encoder and LM stay in eval mode."""
        super().train(mode)
        self.lm.eval()
        if isinstance(self.image_encoder, nn.Module):
            self.image_encoder.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The projector's parameters (the only ones that train)."""
        return list(self.projector.parameters())

    # --- images -> features -> tokens -----------------------------------------------------------

    def encode_images(
        self,
        batch_size: int,
        images: Sequence[ImageInput] | None = None,
        image_features: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
    ) -> list[torch.Tensor | None]:
        """Per sample, the image's features (image_dim,) or None when the image is missing.

        Args:
            batch_size: the number of samples (every given sequence must have this length).
            images: per sample a PIL image, an image file path, a (image_dim,) feature tensor,
                or None (missing).
            image_features: instead of `images`: a (batch, image_dim) tensor, or per sample a
                (image_dim,) tensor or None.

        Raises:
            ValueError: both or mismatched lengths given, or a feature tensor of the wrong shape.
            TypeError: an image is none of the accepted kinds.
            DataFormatError: an image file cannot be read.
        """
        return collect_image_features(
            batch_size, images, image_features,
            dim=self.projector.image_dim, encoder=self.image_encoder,
        )  # fmt: skip

    def image_tokens(self, features: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Per sample, the image tokens (num_image_tokens, hidden) or None (missing)."""
        present = [i for i, f in enumerate(features) if f is not None]
        tokens: list[torch.Tensor | None] = [None] * len(features)
        if present:
            weight = next(self.projector.parameters())
            stacked = torch.stack([f for f in features if f is not None])
            projected = self.projector(stacked.to(device=weight.device, dtype=weight.dtype))
            for row, i in enumerate(present):
                tokens[i] = projected[row]
        return tokens

    # --- prompts -> inputs_embeds ---------------------------------------------------------------

    def prompt_parts(self, prompt: Messages, with_image: bool) -> tuple[str, str | None]:
        """The rendered chat split at the image position: ``(before, after)``.

        Without an image, ``(text, None)``: the whole text-only prompt (marker removed).
        """
        chat = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        messages = [dict(message) for message in chat]
        markers = 0
        for message in messages:
            if not isinstance(message.get("content"), str):
                raise TypeError(f"message content must be a str; got {message.get('content')!r}")
            markers += message["content"].count(self.marker)
        if markers > 1:
            raise ValueError(f"a prompt may hold the image marker {self.marker!r} at most once")
        if markers == 0 and with_image:
            users = [m for m in messages if m.get("role") == "user"]
            if not users:
                raise ValueError("the prompt has no user message to attach the image to")
            users[-1]["content"] = f"{self.marker}\n{users[-1]['content']}"
        text = self.lm.chat_text(messages)
        if (markers or with_image) and self.marker not in text:
            raise ConfigError(f"the chat template dropped the image marker {self.marker!r}")
        if not with_image:
            for removed in (f"{self.marker}\n", self.marker):
                if removed in text:
                    return text.replace(removed, "", 1), None
            return text, None
        before, after = text.split(self.marker, 1)
        return before, after

    def build_inputs(
        self,
        prompts: Sequence[Messages],
        image_tokens: Sequence[torch.Tensor | None],
        answers: Sequence[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Right-padded ``(inputs_embeds, attention_mask, labels)`` for a batch.

        Args:
            prompts: per sample a chat or a str (one user message).
            image_tokens: per sample (P, hidden) tokens to splice at the image position, or
                None for a text-only prompt.
            answers: per sample the assistant's answer, appended (with the end-of-turn token)
                and labelled for teacher forcing.
        """
        if len(image_tokens) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(image_tokens)} image token sets")
        if answers is not None:
            if len(answers) != len(prompts):
                raise ValueError(f"got {len(prompts)} prompts but {len(answers)} answers")
            for i, answer in enumerate(answers):
                if not isinstance(answer, str) or not answer:
                    raise ValueError(f"answer {i} must be a non-empty string; got {answer!r}")
        embed = self.lm.embed_tokens
        device, dtype = self.lm.device, self.lm.dtype
        rows: list[torch.Tensor] = []
        row_labels: list[list[int]] = []
        end = self.lm.tokenizer.eos_token or ""
        for i, (prompt, tokens) in enumerate(zip(prompts, image_tokens)):
            before, after = self.prompt_parts(prompt, with_image=tokens is not None)
            ids = self.lm.encode(before)
            pieces = [embed(torch.tensor(ids, dtype=torch.long, device=device))]
            if tokens is not None:
                after_ids = self.lm.encode(after or "")
                pieces.append(tokens.to(device=device, dtype=dtype))
                pieces.append(embed(torch.tensor(after_ids, dtype=torch.long, device=device)))
            labels = [IGNORE_INDEX] * sum(piece.shape[0] for piece in pieces)
            if answers is not None:
                answer_ids = self.lm.encode(answers[i] + end)
                pieces.append(embed(torch.tensor(answer_ids, dtype=torch.long, device=device)))
                labels += answer_ids
            rows.append(torch.cat(pieces))
            row_labels.append(labels)
        length = max(row.shape[0] for row in rows)
        pad = embed(torch.tensor([pad_token_id(self.lm.tokenizer)], device=device))[0]
        inputs_embeds = pad.expand(len(rows), length, -1).clone()
        attention_mask = torch.zeros(len(rows), length, dtype=torch.long, device=device)
        labels_out = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long, device=device)
        for i, (row, labels) in enumerate(zip(rows, row_labels)):
            inputs_embeds[i, : row.shape[0]] = row
            attention_mask[i, : row.shape[0]] = 1
            labels_out[i, : len(labels)] = torch.tensor(labels, device=device)
        return inputs_embeds, attention_mask, labels_out if answers is not None else None

    def forward(
        self,
        prompts: Sequence[Messages],
        images: Sequence[ImageInput] | None = None,
        *,
        image_features: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
        answers: Sequence[str] | None = None,
    ) -> ProjectorVLMOutput:
        """Logits for a batch, and with `answers` the teacher-forced loss on the answer tokens.

        Args:
            prompts: per sample a chat or a str (one user message).
            images: per sample an image (see `image_features`) or None when it is missing.
            image_features: precomputed features instead of `images`.
            answers: per sample the target answer.
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list with one prompt per sample, not one str")
        features = self.encode_images(len(prompts), images, image_features)
        inputs_embeds, attention_mask, labels = self.build_inputs(
            prompts, self.image_tokens(features), answers
        )
        logits = self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1),
                ignore_index=IGNORE_INDEX,
            )
        return ProjectorVLMOutput(logits, attention_mask, labels, loss)

    @torch.inference_mode()
    def generate(
        self,
        question: Messages,
        image: ImageInput = None,
        *,
        max_new_tokens: int = 32,
        stream: Callable[[str], None] | None = None,
    ) -> str:
        """Greedy-decode the LM's answer to `question` about `image` (None: text-only).

        Args:
            question: a chat or a str (one user message).
            image: a PIL image, an image file path, a (image_dim,) feature tensor, or None.
            max_new_tokens: the most tokens generated.
            stream: called with each new piece of text as it is generated.

        Returns:
            The answer, without special tokens.
        """
        features = self.encode_images(1, [image])
        return self.generate_with_tokens(
            question, self.image_tokens(features)[0], max_new_tokens=max_new_tokens, stream=stream
        )

    @torch.inference_mode()
    def generate_with_tokens(
        self,
        question: Messages,
        image_tokens: torch.Tensor | None,
        *,
        max_new_tokens: int = 32,
        stream: Callable[[str], None] | None = None,
    ) -> str:
        """Greedy-decode the answer with `image_tokens` ((num_image_tokens, hidden) vectors)
        at the image position, or none (None): what `generate` and missing-aware wrappers use.

        Args:
            question: a chat or a str (one user message).
            image_tokens: the vectors spliced at the image position, or None.
            max_new_tokens: the most tokens generated.
            stream: called with each new piece of text as it is generated; the pieces join up
                to the returned text.
        """
        from transformers import GenerationConfig

        inputs_embeds, attention_mask, _ = self.build_inputs([question], [image_tokens])
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_token_ids(self.lm.model, self.lm.tokenizer),
            pad_token_id=pad_token_id(self.lm.tokenizer),
        )
        # Given only inputs_embeds, generate returns just the new tokens.
        streamer = CallbackStreamer(self.lm.tokenizer, stream) if stream is not None else None
        output = self.lm.model.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            generation_config=config,
            streamer=streamer,
        )
        answer: str = self.lm.tokenizer.decode(output[0], skip_special_tokens=True)
        return answer

    # --- artifacts ------------------------------------------------------------------------------

    def save_projector(self, directory: str | Path) -> Path:
        """Write `CONFIG_FILE` and `WEIGHTS_FILE` (safetensors) to `directory`, atomically.

        Both files are written into a temporary folder beside `directory` that then replaces it
        (`os.replace`), so a reader never sees a half-written projector.
        """
        return write_projector_files(
            self.projector, directory, marker=self.marker, language_model=self.lm.name,
            image_encoder=getattr(self.image_encoder, "name", None),
        )  # fmt: skip

    def load_projector(self, directory: str | Path) -> ProjectorVLM:
        """Load projector weights saved by `save_projector` into this model; returns self.

        Raises:
            DataFormatError: the files are missing or unreadable.
            ConfigError: the saved sizes differ from this model's projector.
        """
        read_projector_files(self.projector, directory, language_model=self.lm.name)
        return self


def build_offline_vlm(
    cache_dir: str | Path | None = None,
    *,
    num_image_tokens: int = 4,
    image_size: int = 224,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
) -> ProjectorVLM:
    """EfficientNet-Lite0 (1280-d features) + a fresh projector + SmolLM2-135M-Instruct, offline.

    The projector is untrained: train it (`trainable_parameters`, `forward` with answers) or load
    one (`load_projector`) before expecting useful answers.

    Args:
        cache_dir: the cache root for the converted SmolLM2 copy (see `load_smollm2`).
        num_image_tokens: image tokens spliced into the prompt per image.
        image_size: the encoder's input resolution.
        dtype: the LM's parameter dtype (the projector stays float32).
        device: where to put the models.
    """
    from mllm_missing.backbones.hf import load_smollm2
    from mllm_missing.backbones.offline import load_default_image_encoder

    encoder = load_default_image_encoder(image_size=image_size, device=device)
    lm = load_smollm2(cache_dir=cache_dir, dtype=dtype, device=device)
    return ProjectorVLM(lm, encoder, num_image_tokens=num_image_tokens)
