"""`ProjectorVLM` plus learned missing-image tokens: MAP's missing-aware prompt at the LLM input.

A present image is projected to ``num_image_tokens`` vectors spliced at the image position of
the chat prompt; an absent one is replaced there by the same number of learned vectors
(`MissingImageTokens`), so the frozen LM is told that the image is absent instead of getting a
plain text-only prompt. Both the projector and the missing tokens train; the LM stays frozen.

Artifacts (`MissingAwareVLM.save_pretrained`): the projector in ``projector/`` (its own
``projector_config.json`` + ``projector_model.safetensors``), the tokens in
``missing_tokens.safetensors`` and ``missing_tokens.json``; load them onto a fresh
`ProjectorVLM` with `MissingAwareVLM.from_pretrained`.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mllm_missing.atomic import atomic_directory
from mllm_missing.backbones.hf import Messages, pad_token_id
from mllm_missing.backbones.projector_vlm import IGNORE_INDEX, ImageInput, ProjectorVLM
from mllm_missing.errors import ConfigError, DataFormatError
from mllm_missing.types import Presence, status_text

__all__ = [
    "MISSING_CONFIG_FILE",
    "MISSING_WEIGHTS_FILE",
    "PROJECTOR_DIR",
    "MissingAwareVLM",
    "MissingImageTokens",
]

PROJECTOR_DIR = "projector"
MISSING_WEIGHTS_FILE = "missing_tokens.safetensors"
MISSING_CONFIG_FILE = "missing_tokens.json"


class MissingImageTokens(nn.Module):
    """``num_tokens`` learned vectors that stand in for an absent image's tokens.

    Args:
        num_tokens: vectors per absent image (the projector's ``num_image_tokens``).
        hidden_size: the LM's embedding width.
        scale: standard deviation of the random initialisation (match the LM's embeddings).
    """

    def __init__(self, num_tokens: int, hidden_size: int, scale: float = 0.02):
        super().__init__()
        if num_tokens < 1 or hidden_size < 1:
            raise ConfigError(
                f"num_tokens and hidden_size must be >= 1; got {num_tokens}, {hidden_size}"
            )
        self.tokens = nn.Parameter(torch.randn(num_tokens, hidden_size) * scale)

    def forward(self) -> torch.Tensor:
        """The tokens (num_tokens, hidden_size)."""
        return self.tokens


class MissingAwareVLM(nn.Module):
    """A `ProjectorVLM` whose absent images get learned tokens instead of nothing.

    Args:
        vlm: the composed model (frozen encoder + projector + frozen LM).
        missing_tokens: the learned tokens (default: fresh, scaled like the LM's embeddings).
        system_prompt: a system message put before every question (``""`` keeps the template's
            system turn but empty, which stops SmolLM2's template from adding its long default);
            None leaves the chat as given.
    """

    def __init__(
        self,
        vlm: ProjectorVLM,
        missing_tokens: MissingImageTokens | None = None,
        *,
        system_prompt: str | None = "",
    ):
        super().__init__()
        self.vlm = vlm
        if missing_tokens is None:
            weight = vlm.lm.model.get_input_embeddings().weight
            scale = float(weight.detach().float().std())
            missing_tokens = MissingImageTokens(vlm.num_image_tokens, vlm.lm.hidden_size, scale)
        if tuple(missing_tokens.tokens.shape) != (vlm.num_image_tokens, vlm.lm.hidden_size):
            raise ConfigError(
                f"missing tokens of shape {tuple(missing_tokens.tokens.shape)} do not fit "
                f"{vlm.num_image_tokens} image tokens of width {vlm.lm.hidden_size}"
            )
        self.missing_tokens = missing_tokens.to(vlm.lm.device)
        self.system_prompt = system_prompt

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The projector's parameters and the missing tokens."""
        return [*self.vlm.trainable_parameters(), *self.missing_tokens.parameters()]

    def chat(self, question: Messages) -> list[dict[str, str]]:
        """`question` as a chat, with the system prompt first (unless it has its own)."""
        messages = (
            [{"role": "user", "content": question}]
            if isinstance(question, str)
            else [dict(m) for m in question]
        )
        if self.system_prompt is not None and messages[0].get("role") != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def image_tokens(
        self, features: Sequence[torch.Tensor | None], use_missing_tokens: bool = True
    ) -> list[torch.Tensor | None]:
        """Per sample the projected image, or for an absent one the missing tokens (or None
        with ``use_missing_tokens=False``: the plain text-only prompt)."""
        tokens = self.vlm.image_tokens(features)
        if use_missing_tokens:
            tokens = [self.missing_tokens() if t is None else t for t in tokens]
        return tokens

    def _tokens(
        self, batch_size: int, images: Any, image_features: Any, use_missing_tokens: bool
    ) -> list[torch.Tensor | None]:
        features = self.vlm.encode_images(batch_size, images, image_features)
        return self.image_tokens(features, use_missing_tokens)

    def loss(
        self,
        questions: Sequence[Messages],
        answers: Sequence[str],
        images: Sequence[ImageInput] | None = None,
        *,
        image_features: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """Mean cross-entropy over the answer tokens (answer + end of turn), teacher-forced.

        Only the answer positions go through the LM head (a 49k-word vocabulary at every
        position would cost more than the LM's last blocks).
        """
        tokens = self._tokens(len(questions), images, image_features, True)
        chats = [self.chat(q) for q in questions]
        embeds, mask, labels = self.vlm.build_inputs(chats, tokens, answers)
        assert labels is not None
        hidden = _hidden_states(self.vlm.lm.model, embeds, mask)
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = self.vlm.lm.model.get_output_embeddings()(hidden[:, :-1][keep])
        return F.cross_entropy(logits.float(), targets[keep])

    @torch.inference_mode()
    def score_answers(
        self,
        questions: Sequence[Messages],
        options: Sequence[str],
        images: Sequence[ImageInput] | None = None,
        *,
        image_features: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
        use_missing_tokens: bool = True,
    ) -> torch.Tensor:
        """Log-likelihood (batch, len(options)) of each option + end of turn as the answer.

        The same quantity as `FrozenCausalLM.score_options` (sum over the option's tokens and
        the end-of-turn token), computed with the prompt run once and its key/value cache shared
        by every option.
        """
        lm = self.vlm.lm
        if not options or any(not isinstance(o, str) or not o for o in options):
            raise ValueError("options must be a non-empty list of non-empty strings")
        tokens = self._tokens(len(questions), images, image_features, use_missing_tokens)
        embeds, mask, _ = self.vlm.build_inputs([self.chat(q) for q in questions], tokens)
        # Left padding: every prompt ends at the last column, so the options follow directly.
        lengths = mask.sum(1)
        width = mask.shape[1]
        for i, length in enumerate(lengths.tolist()):
            embeds[i] = embeds[i].roll(width - length, dims=0)
            mask[i] = mask[i].roll(width - length, dims=0)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        model = lm.model
        out = model.base_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True
        )
        head = model.get_output_embeddings()
        first = head(out.last_hidden_state[:, -1]).float().log_softmax(-1)  # (B, V)
        end = lm.tokenizer.eos_token or ""
        ids = [lm.encode(option + end) for option in options]
        scores = first[:, [i[0] for i in ids]].clone()  # (B, K)
        longest = max(len(i) for i in ids) - 1
        if longest == 0:
            return scores.cpu()
        batch, count = len(questions), len(options)
        feed = torch.full((count, longest), pad_token_id(lm.tokenizer), dtype=torch.long)
        targets = torch.full((count, longest), IGNORE_INDEX, dtype=torch.long)
        for k, option_ids in enumerate(ids):
            feed[k, : len(option_ids) - 1] = torch.tensor(option_ids[:-1])
            targets[k, : len(option_ids) - 1] = torch.tensor(option_ids[1:])
        feed, targets = feed.to(lm.device), targets.to(lm.device)
        # transformers >= 5.25 names the key/value cache `cache` (`past_key_values` before).
        cache = getattr(out, "cache", None) or out.past_key_values
        cache.batch_repeat_interleave(count)
        cache_arg = (
            "cache"
            if "cache" in inspect.signature(model.base_model.forward).parameters
            else "past_key_values"
        )
        feed_mask = (targets != IGNORE_INDEX).long().repeat(batch, 1)
        step_mask = torch.cat([mask.repeat_interleave(count, 0), feed_mask], dim=1)
        step_positions = lengths.repeat_interleave(count)[:, None] + torch.arange(longest)[None]
        hidden = model.base_model(
            inputs_embeds=lm.embed_tokens(feed.repeat(batch, 1)),
            attention_mask=step_mask,
            position_ids=step_positions.to(lm.device),
            use_cache=True,
            **{cache_arg: cache},
        ).last_hidden_state
        log_probs = head(hidden).float().log_softmax(-1)  # (B*K, longest, V)
        flat = targets.repeat(batch, 1)
        picked = log_probs.gather(-1, flat.clamp(min=0)[..., None]).squeeze(-1)
        picked = picked.masked_fill(flat == IGNORE_INDEX, 0.0).sum(-1).view(batch, count)
        return (scores + picked).cpu()

    @torch.inference_mode()
    def generate(
        self,
        question: Messages,
        image: ImageInput = None,
        *,
        max_new_tokens: int = 32,
        missing_prompt: str = "learned",
        stream: Callable[[str], None] | None = None,
    ) -> str:
        """Greedy answer to `question` about `image`.

        Args:
            question: the user's question (or a chat).
            image: the image; None when it is absent.
            max_new_tokens: answer length limit.
            missing_prompt: for an absent image, ``learned`` (the learned missing tokens stand
                in for it) or ``status_text`` (no image tokens; the MissRAG status line
                "Input modality status: image: missing; text: present." goes before a text
                question).
            stream: called with each new piece of the answer as it is generated.

        Raises:
            ConfigError: an unknown `missing_prompt`.
        """
        if missing_prompt not in ("learned", "status_text"):
            raise ConfigError(
                f"missing_prompt must be one of learned, status_text; got {missing_prompt!r}"
            )
        told = image is None and missing_prompt == "status_text"
        if told and isinstance(question, str):
            question = f"{status_text(Presence.of('text'))}\n{question}"
        tokens = self._tokens(1, [image], None, not told)
        return self.vlm.generate_with_tokens(
            self.chat(question), tokens[0], max_new_tokens=max_new_tokens, stream=stream
        )

    # --- artifacts ------------------------------------------------------------------------------

    def write_files(self, directory: str | Path) -> None:
        """Write the projector and the missing tokens into an existing `directory`."""
        from safetensors.torch import save_file

        directory = Path(directory)
        self.vlm.save_projector(directory / PROJECTOR_DIR)
        tokens = self.missing_tokens.tokens.detach().cpu().contiguous()
        save_file(
            {"tokens": tokens}, str(directory / MISSING_WEIGHTS_FILE), metadata={"format": "pt"}
        )
        config = {
            "num_tokens": int(tokens.shape[0]),
            "hidden_size": int(tokens.shape[1]),
            "system_prompt": self.system_prompt,
        }
        (directory / MISSING_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the projector and missing tokens to `directory`, atomically (replacing it)."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        with atomic_directory(directory) as partial:
            self.write_files(partial)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, vlm: ProjectorVLM) -> MissingAwareVLM:
        """Load a saved projector + missing tokens onto `vlm` (a `ProjectorVLM` of the same sizes).

        Raises:
            DataFormatError: files missing or unreadable.
            ConfigError: the saved sizes differ from `vlm`'s.
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        vlm.load_projector(directory / PROJECTOR_DIR)
        config_path = directory / MISSING_CONFIG_FILE
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
            tokens = load_file(str(directory / MISSING_WEIGHTS_FILE))["tokens"]
        except Exception as exc:  # OSError, JSON or safetensors errors
            raise DataFormatError(f"{directory}: unreadable missing-image tokens ({exc})") from exc
        missing = MissingImageTokens(int(tokens.shape[0]), int(tokens.shape[1]))
        with torch.no_grad():
            missing.tokens.copy_(tokens)
        return cls(vlm, missing, system_prompt=config.get("system_prompt", ""))


def _hidden_states(model: Any, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The causal LM's last hidden states (before its head) for right-padded `embeds`."""
    output = model.base_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
    hidden: torch.Tensor = output.last_hidden_state
    return hidden
