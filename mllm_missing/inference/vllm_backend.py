"""LLM generation through vLLM: per-missing-case LoRA adapters and learned prompts as embeddings.

**Not run here**: vLLM cannot be installed on this project's machines. What is tested is the
request building, which needs no vLLM: `build_requests` turns samples into plain dataclasses that
map one-to-one onto vLLM's inputs:

- `AdapterRef` -> ``vllm.lora.request.LoRARequest(lora_name, lora_int_id, lora_path)``: each
  sample goes to the adapter of its missing case (``image``, ``text``, ``image+text``: the
  routed ``lora`` strategy's subfolder names), with integer ids that depend only on the case
  (its index among the cases of the modalities, plus one; vLLM wants ids > 0), so the same case
  gets the same id in every call and process;
- `GenerationRequest.to_vllm_prompt()` -> ``{"prompt": text}``, or with learned prompts
  ``{"prompt_embeds": tensor}`` where the tensor is the case's learned prompt rows followed by
  the prompt's token embeddings, shape (P + T, hidden).

`VLLMBackend` imports vllm only when it builds the engine, and passes tensor parallelism,
quantization and LoRA limits through to ``vllm.LLM``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mllm_missing.errors import ConfigError, DataFormatError, MissingDependencyError
from mllm_missing.types import MODALITY_ORDER, Modality, Sample

__all__ = [
    "SHARED_ADAPTER",
    "AdapterRef",
    "GenerationRequest",
    "VLLMBackend",
    "adapter_refs",
    "build_requests",
    "case_of",
    "is_vllm_available",
]

#: Key of an adapter used for every case that has none of its own (the shared ``lora`` adapter).
SHARED_ADAPTER = "default"
_INSTALL = "pip install 'mllm-missing[vllm]'"


def is_vllm_available() -> bool:
    """Whether vllm is installed (found without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def _vllm() -> Any:
    if not is_vllm_available():
        raise MissingDependencyError(f"the vLLM backend needs vllm; install it with: {_INSTALL}")
    import vllm

    return vllm


@dataclass(frozen=True)
class AdapterRef:
    """One LoRA adapter as vLLM names it (the fields of ``LoRARequest``)."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def to_vllm(self) -> Any:
        """The ``vllm.lora.request.LoRARequest`` (imports vllm)."""
        _vllm()
        from vllm.lora.request import LoRARequest

        return LoRARequest(self.lora_name, self.lora_int_id, self.lora_path)


@dataclass
class GenerationRequest:
    """One generation request, ready for vLLM.

    Attributes:
        id: the sample's id.
        case: its missing case (present modalities joined by ``+``).
        prompt: the text prompt.
        prompt_embeds: (P + T, hidden) learned prompt rows then the prompt's token embeddings,
            or None to send the text.
        lora: the adapter to apply, or None for the base model.
    """

    id: str
    case: str
    prompt: str
    prompt_embeds: torch.Tensor | None = None
    lora: AdapterRef | None = None

    def to_vllm_prompt(self) -> dict[str, Any]:
        """``{"prompt_embeds": tensor}`` when embeddings were built, else ``{"prompt": text}``."""
        if self.prompt_embeds is not None:
            return {"prompt_embeds": self.prompt_embeds}
        return {"prompt": self.prompt}


def _cases(modalities: Sequence[Modality]) -> list[str]:
    from mllm_missing.strategies.base import case_names

    return case_names(list(modalities))


def case_of(sample: Sample, modalities: Sequence[Modality]) -> str:
    """The missing case of `sample` over `modalities` (e.g. ``"text"`` when the image is absent).

    Raises:
        ConfigError: the sample has none of `modalities`.
    """
    case = "+".join(m.value for m in modalities if m in sample.presence)
    if not case:
        names = ", ".join(m.value for m in modalities)
        raise ConfigError(f"sample {sample.id!r} has none of the modalities {names}")
    return case


def adapter_refs(
    adapters: Mapping[str, str | Path], modalities: Sequence[Modality]
) -> dict[str, AdapterRef]:
    """Case name -> `AdapterRef`, with stable integer ids (case index + 1; the shared adapter
    ``default`` gets the next id).

    Raises:
        ConfigError: a key is neither a case of `modalities` nor ``default``.
        DataFormatError: an adapter folder has no ``adapter_config.json``.
    """
    cases = _cases(modalities)
    refs: dict[str, AdapterRef] = {}
    for name, folder in adapters.items():
        if name == SHARED_ADAPTER:
            ident = len(cases) + 1
        elif name in cases:
            ident = cases.index(name) + 1
        else:
            raise ConfigError(
                f"adapters: {name!r} is not a missing case; allowed: {', '.join(cases)}, "
                f"{SHARED_ADAPTER}"
            )
        path = Path(folder)
        if not (path / "adapter_config.json").is_file():
            raise DataFormatError(f"adapter {name!r}: {path} has no adapter_config.json")
        refs[name] = AdapterRef(name, ident, str(path))
    return refs


def _default_render(sample: Sample) -> str:
    text = sample.payloads.get(Modality.TEXT)
    if not isinstance(text, str):
        raise ConfigError(
            f"sample {sample.id!r} has no text to prompt with; pass render= to describe it"
        )
    return text


def build_requests(
    samples: Sequence[Sample],
    *,
    modalities: Sequence[Modality | str] = (Modality.IMAGE, Modality.TEXT),
    adapters: Mapping[str, str | Path] | None = None,
    learned_prompts: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    embed: Callable[[str], torch.Tensor] | None = None,
    render: Callable[[Sample], str] | None = None,
) -> list[GenerationRequest]:
    """vLLM requests for `samples`: the prompt, its case's adapter, and optional prompt embeddings.

    Args:
        samples: the inputs; each is routed by its missing case over `modalities`.
        modalities: the modalities the adapters and prompts were trained over (in
            `MODALITY_ORDER`, as the ``lora`` strategy names its cases).
        adapters: case name (or ``default``) -> adapter folder in peft's layout, e.g. the case
            subfolders of a routed ``lora`` checkpoint.
        learned_prompts: (P, hidden) rows put before every prompt, or case -> (P, hidden).
        embed: prompt text -> (T, hidden) token embeddings (e.g. the LLM's input embeddings of
            its tokens); needed with `learned_prompts`.
        render: sample -> prompt text (default: its text payload).

    Raises:
        ConfigError: learned prompts without `embed`, a case with no learned prompt, widths that
            differ, or a sample with no text and no `render`.
    """
    order = [Modality.parse(m) for m in modalities]
    order.sort(key=MODALITY_ORDER.index)
    refs = adapter_refs(adapters or {}, order)
    if learned_prompts is not None and embed is None:
        raise ConfigError("learned_prompts need embed= (prompt text -> token embeddings)")
    render = render or _default_render
    requests = []
    for sample in samples:
        case = case_of(sample, order)
        prompt = render(sample)
        lora = refs.get(case, refs.get(SHARED_ADAPTER))
        embeds = None
        if learned_prompts is not None and embed is not None:
            if isinstance(learned_prompts, torch.Tensor):
                rows = learned_prompts
            elif case in learned_prompts:
                rows = learned_prompts[case]
            else:
                known = ", ".join(learned_prompts)
                raise ConfigError(f"learned_prompts: no prompt for case {case!r}; have {known}")
            tokens = embed(prompt)
            if rows.ndim != 2 or tokens.ndim != 2 or rows.shape[1] != tokens.shape[1]:
                raise ConfigError(
                    f"learned prompts {tuple(rows.shape)} and token embeddings "
                    f"{tuple(tokens.shape)} must be (rows, hidden) of the same width"
                )
            embeds = torch.cat([rows.to(tokens.device, tokens.dtype), tokens]).detach()
        requests.append(GenerationRequest(sample.id, case, prompt, embeds, lora))
    return requests


class VLLMBackend:
    """A vLLM engine for a local causal LM, with LoRA and prompt embeddings enabled as asked.

    Args:
        model_path: a local checkpoint folder (transformers layout).
        tensor_parallel_size: GPUs the model is sharded over.
        quantization: vLLM's quantization method (``"bitsandbytes"``, ``"awq"``, ``"gptq"``,
            ``"fp8"``, ...); ``"nf4"`` is taken as ``"bitsandbytes"`` (vLLM's in-flight 4-bit).
        enable_lora: serve LoRA adapters.
        max_loras: adapters held at once in a batch.
        max_lora_rank: the largest adapter rank served.
        enable_prompt_embeds: accept ``prompt_embeds`` inputs (learned prompts).
        dtype: vLLM's ``dtype`` (``"auto"``, ``"bfloat16"``, ...).
        **engine_kwargs: passed to ``vllm.LLM`` as they are.

    Raises:
        ConfigError: bad sizes.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        tensor_parallel_size: int = 1,
        quantization: str | None = None,
        enable_lora: bool = False,
        max_loras: int = 1,
        max_lora_rank: int = 16,
        enable_prompt_embeds: bool = False,
        dtype: str = "auto",
        **engine_kwargs: Any,
    ) -> None:
        for name, value in (
            ("tensor_parallel_size", tensor_parallel_size),
            ("max_loras", max_loras),
            ("max_lora_rank", max_lora_rank),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1; got {value!r}")
        self.model_path = str(model_path)
        self.tensor_parallel_size = tensor_parallel_size
        self.quantization = "bitsandbytes" if quantization == "nf4" else quantization
        self.enable_lora = enable_lora
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.enable_prompt_embeds = enable_prompt_embeds
        self.dtype = dtype
        self.engine_kwargs = dict(engine_kwargs)
        self._llm: Any = None

    def engine_args(self) -> dict[str, Any]:
        """The keyword arguments given to ``vllm.LLM``."""
        args: dict[str, Any] = {
            "model": self.model_path,
            "tensor_parallel_size": self.tensor_parallel_size,
            "dtype": self.dtype,
        }
        if self.quantization:
            args["quantization"] = self.quantization
        if self.enable_lora:
            args.update(
                enable_lora=True, max_loras=self.max_loras, max_lora_rank=self.max_lora_rank
            )
        if self.enable_prompt_embeds:
            args["enable_prompt_embeds"] = True
        args.update(self.engine_kwargs)
        return args

    @property
    def llm(self) -> Any:
        """The ``vllm.LLM`` (built on first use).

        Raises:
            MissingDependencyError: vllm is not installed (names the install command).
        """
        if self._llm is None:
            vllm = _vllm()
            self._llm = vllm.LLM(**self.engine_args())
        return self._llm

    def check(self, requests: Sequence[GenerationRequest]) -> None:
        """Refuse requests this engine was not configured for (LoRA or prompt embeddings off)."""
        if any(r.lora is not None for r in requests) and not self.enable_lora:
            raise ConfigError("requests carry LoRA adapters: build the backend with enable_lora")
        if any(r.prompt_embeds is not None for r in requests) and not self.enable_prompt_embeds:
            raise ConfigError(
                "requests carry prompt_embeds: build the backend with enable_prompt_embeds"
            )

    def generate(
        self, requests: Sequence[GenerationRequest], *, max_tokens: int = 64, **sampling: Any
    ) -> list[str]:
        """Generated texts, one per request (greedy unless `sampling` says otherwise)."""
        self.check(requests)
        vllm = _vllm()
        params = vllm.SamplingParams(max_tokens=max_tokens, **{"temperature": 0.0, **sampling})
        prompts = [r.to_vllm_prompt() for r in requests]
        loras = [r.lora.to_vllm() if r.lora is not None else None for r in requests]
        outputs = self.llm.generate(
            prompts, params, lora_request=loras if any(loras) else None, use_tqdm=False
        )
        return [output.outputs[0].text for output in outputs]
