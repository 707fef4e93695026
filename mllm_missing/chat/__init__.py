"""Chat with partial inputs: a `ChatSession` over a trained checkpoint, the missing-aware VLM or
a generative model, a terminal REPL (`run_repl`) and a web page (`serve`), all started by
`mllm-missing chat`."""

from __future__ import annotations

from mllm_missing.chat.answerers import (
    Answerer,
    ClassifierAnswerer,
    GenerativeAnswerer,
    VLMAnswerer,
)
from mllm_missing.chat.inputs import ChatInputError, ChatLimits, WhisperTranscriber
from mllm_missing.chat.session import ChatSession, ChatTurn

__all__ = [
    "Answerer",
    "ChatInputError",
    "ChatLimits",
    "ChatSession",
    "ChatTurn",
    "ClassifierAnswerer",
    "GenerativeAnswerer",
    "VLMAnswerer",
    "WhisperTranscriber",
]
