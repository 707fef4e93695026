"""Retrieval-augmented prompts (RAGPT, Lang et al. AAAI 2025): prompts built from the retrieved
neighbours' embeddings of the missing modality."""

from mllm_missing.strategies.rag_prompts.config import RagPromptsConfig
from mllm_missing.strategies.rag_prompts.module import RagPrompts

__all__ = ["RagPrompts", "RagPromptsConfig"]
