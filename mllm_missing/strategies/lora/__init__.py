"""LoRA on the frozen towers (peft), optionally one adapter per missing case (MoRA-style routing)."""

from mllm_missing.strategies.lora.config import LoraStrategyConfig
from mllm_missing.strategies.lora.module import LoraStrategy

__all__ = ["LoraStrategy", "LoraStrategyConfig"]
