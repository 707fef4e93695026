"""Configuration of LoRA adapters on the frozen towers (`lora`)."""

from __future__ import annotations

from dataclasses import dataclass

from mllm_missing.errors import ConfigError
from mllm_missing.strategies.base import StrategyConfig, register_strategy

__all__ = ["LoraStrategyConfig"]


@register_strategy("lora", module="mllm_missing.strategies.lora.module:LoraStrategy")
@dataclass
class LoraStrategyConfig(StrategyConfig):
    """Low-rank adapters (peft LoRA) on the linear layers of the towers it acts on.

    Both values of ``init`` give peft's default initialisation (A random, B = 0), so the
    strategy is an exact no-op on the frozen backbone at start either way and trains from the
    first step (B gets gradients at once; a zero A as well would never train).

    Args:
        r: rank of every adapter.
        alpha: LoRA scaling numerator (the update is scaled by ``alpha / r``).
        dropout: dropout on the adapter's input while the strategy is in train mode.
        target_modules: names (or dotted name suffixes) of the linear layers to adapt; empty:
            the default of each tower's family (Llama-style ``q_proj, k_proj, v_proj, o_proj``;
            Whisper-style ``q_proj, k_proj, v_proj, out_proj``; BERT-style ``query, key, value,
            dense``; open_clip ``out_proj, c_fc, c_proj``), detected from the modules present.
        routed: one adapter per missing case, each sample going through its case's adapter
            (the MoRA idea); else one adapter shared by every case.
        modalities: towers to adapt (default: every tower with target modules).
        init: ``normal`` or ``zero``; the same here (see above).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()
    routed: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"strategy.r must be an int >= 1; got {self.r!r}")
        if not self.alpha > 0:
            raise ConfigError(f"strategy.alpha must be > 0; got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"strategy.dropout must be in [0, 1); got {self.dropout!r}")
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)
        bad = [t for t in self.target_modules if not isinstance(t, str) or not t.strip(".")]
        if bad:
            raise ConfigError(f"strategy.target_modules must be module names; got {bad!r}")
        if not isinstance(self.routed, bool):
            raise ConfigError(f"strategy.routed must be true or false; got {self.routed!r}")
