"""Configuration of retrieval-augmented prompts (`rag_prompts`)."""

from __future__ import annotations

from dataclasses import dataclass

from mllm_missing.errors import ConfigError
from mllm_missing.strategies.base import register_strategy
from mllm_missing.strategies.prompting import PromptConfig
from mllm_missing.strategies.retrieval import DTYPES

__all__ = ["RagPromptsConfig"]


@register_strategy("rag_prompts", module="mllm_missing.strategies.rag_prompts.module:RagPrompts")
@dataclass
class RagPromptsConfig(PromptConfig):
    """Retrieval-augmented prompts: per-case prompts plus prompts generated from the retrieved
    neighbours' embeddings of each missing modality.

    The prompt fields are those of `PromptConfig` (``prompt_type``, ``prompt_length``,
    ``prompt_layers``, ``init``, ``init_std``, ``modalities``).

    Args:
        k: neighbours retrieved per sample and missing modality (fewer when the memory bank
            has fewer candidates).
        hidden_size: hidden width of the prompt generator.
        retrieval: ``false`` feeds the generator zeros instead of the neighbours (no memory
            bank is built): the same parameters without retrieval, the ablation that says what
            retrieval itself adds.
        bank_dtype: storage dtype of the memory bank saved with the model (``float16`` halves
            its size).
        label_context: also feed the generator, for every modality a sample has, the mean
            label of its k nearest training samples by that modality (RAGPT's label-enhanced
            prompt), complete samples included. Off by default, as models saved before it
            existed were trained without it.
    """

    k: int = 8
    hidden_size: int = 128
    retrieval: bool = True
    bank_dtype: str = "float16"
    label_context: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"strategy.k must be an integer >= 1; got {self.k!r}")
        if self.hidden_size < 1:
            raise ConfigError(f"strategy.hidden_size must be >= 1; got {self.hidden_size}")
        if not isinstance(self.label_context, bool):
            raise ConfigError(
                f"strategy.label_context must be true or false; got {self.label_context!r}"
            )
        if not isinstance(self.retrieval, bool):
            raise ConfigError(f"strategy.retrieval must be true or false; got {self.retrieval!r}")
        if self.bank_dtype not in DTYPES:
            raise ConfigError(
                f"strategy.bank_dtype must be one of {', '.join(DTYPES)}; got {self.bank_dtype!r}"
            )
