"""Frozen foundation models: the offline default encoders, transformers LLMs, Whisper audio."""
