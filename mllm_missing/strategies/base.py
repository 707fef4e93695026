"""The protocol every parameter-efficient strategy implements, and the one place they register.

A strategy is a small trainable module composed with a frozen `Backbone` (never a subclass of
it). It sees each tower call through `Strategy.encode(backbone, modality, inputs, presence)`:
prompt strategies turn the presence mask into `LayerPrompts` for that tower, LoRA routes the call
through the adapter of each sample's missing case. A strategy registers exactly once, by a
decorator on its config dataclass::

    @register_strategy("map_prompts", module="mllm_missing.strategies.map_prompts.module:MapPrompts")
    @dataclass
    class MapPromptsConfig(StrategyConfig): ...

`build_strategy(config, backbone)` builds it; `STRATEGIES` lists the names.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from mllm_missing.backbones.base import Backbone, EncoderOutput, LayerPrompts
from mllm_missing.errors import ConfigError
from mllm_missing.registry import Registry
from mllm_missing.types import Modality, presence_codes

__all__ = [
    "STRATEGIES",
    "Strategy",
    "StrategyConfig",
    "build_strategy",
    "case_codes",
    "register_strategy",
    "strategy_config_from_dict",
]

#: Strategy name -> its config dataclass (module paths of the modules load lazily).
STRATEGIES: Registry[type[StrategyConfig]] = Registry("strategy")
_LAZY_CONFIGS = {
    "map_prompts": "mllm_missing.strategies.map_prompts.config:MapPromptsConfig",
    "modality_prompts": "mllm_missing.strategies.modality_prompts.config:ModalityPromptsConfig",
    "correlated_prompts": (
        "mllm_missing.strategies.correlated_prompts.config:CorrelatedPromptsConfig"
    ),
    "lora": "mllm_missing.strategies.lora.config:LoraStrategyConfig",
    "rag_prompts": "mllm_missing.strategies.rag_prompts.config:RagPromptsConfig",
}

C = TypeVar("C", bound="StrategyConfig")


def register_strategy(name: str, *, module: str) -> Any:
    """Decorator on a strategy's config dataclass: registers it under `name`.

    Args:
        name: the strategy name used in configs (``strategy.method``).
        module: ``"package.module:Class"`` of the `Strategy` the config builds (imported lazily).
    """

    def decorate(cls: type[C]) -> type[C]:
        cls.method = name
        cls.module = module
        STRATEGIES._add(name, cls)
        return cls

    return decorate


@dataclass
class StrategyConfig:
    """Base of every strategy config. Subclasses add their own fields and checks.

    Args:
        modalities: towers the strategy acts on (default: every tower of the backbone that it
            can act on).
        init: ``normal`` (small random values, trainable from the first step) or ``zero`` (an
            exact no-op on the frozen backbone until trained).
    """

    method: ClassVar[str] = ""
    module: ClassVar[str] = ""

    modalities: tuple[str, ...] = ()
    init: str = "normal"

    def __post_init__(self) -> None:
        self.modalities = tuple(Modality.parse(m).value for m in self.modalities)
        if self.init not in ("normal", "zero"):
            raise ConfigError(f"strategy.init must be one of normal, zero; got {self.init!r}")

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-ready values, with its ``method``."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        return {"method": self.method, **values}


def strategy_config_from_dict(values: Mapping[str, Any]) -> StrategyConfig:
    """Build the config of ``values["method"]`` from a mapping; errors name the field."""
    from mllm_missing.config import load_config

    values = dict(values)
    method = values.pop("method", "none")
    cls = _config_class(str(method))
    try:
        return load_config(cls, None, values)
    except ConfigError as exc:
        raise ConfigError(f"strategy ({method}): {exc}") from None


def _register_lazy() -> None:
    for name, target in _LAZY_CONFIGS.items():
        if name not in STRATEGIES:
            STRATEGIES.register_lazy(name, target)


def _config_class(method: str) -> type[StrategyConfig]:
    _register_lazy()
    if method not in STRATEGIES:
        raise ConfigError(
            f"strategy.method must be one of {', '.join(STRATEGIES.names())}; got {method!r}"
        )
    return STRATEGIES.get(method)


def available_strategies() -> list[str]:
    """Every registered strategy name."""
    _register_lazy()
    return STRATEGIES.names()


def case_codes(presence: torch.Tensor, modalities: Sequence[Modality]) -> torch.Tensor:
    """Per-row missing-case index in ``0 .. 2**len(modalities) - 2``.

    Bit i of ``index + 1`` is set when ``modalities[i]`` is present; index 0 is the case with
    only the first modality, the last index the complete case. A row with none of `modalities`
    raises (there is no case for it).
    """
    codes = presence_codes(presence, modalities)
    if bool((codes == 0).any()):
        row = int((codes == 0).nonzero()[0])
        names = ", ".join(Modality.parse(m).value for m in modalities)
        raise ValueError(f"row {row} has none of the strategy's modalities ({names})")
    return codes - 1


def case_names(modalities: Sequence[Modality]) -> list[str]:
    """Names of the cases of `case_codes`, e.g. ``["image", "text", "image+text"]``."""
    names = []
    for code in range(1, 2 ** len(modalities)):
        present = [Modality.parse(m).value for i, m in enumerate(modalities) if code >> i & 1]
        names.append("+".join(present))
    return names


class Strategy(nn.Module):
    """Base of the strategies: a trainable module composed with a frozen backbone.

    Subclasses implement `prompts` (prompt strategies) or override `encode` (adapters). The
    backbone is not a submodule: a strategy's `state_dict` holds only its own parameters.

    Args:
        config: the strategy's config.
        backbone: the frozen backbone it will be used with (read for widths and block counts).
        modalities: the dataset's modalities (the missing cases are built over these).
    """

    def __init__(
        self, config: StrategyConfig, backbone: Backbone, modalities: Sequence[Modality]
    ) -> None:
        super().__init__()
        self.config = config
        self.data_modalities = tuple(Modality.parse(m) for m in modalities)
        wanted = [Modality.parse(m) for m in config.modalities] or list(backbone.modalities)
        unknown = [m.value for m in wanted if m not in backbone.modalities]
        if unknown:
            raise ConfigError(
                f"strategy.modalities: the backbone {backbone.name!r} has no {', '.join(unknown)} "
                f"tower; it has {', '.join(m.value for m in backbone.modalities)}"
            )
        self.towers = tuple(m for m in wanted if self.supports(backbone, m))

    #: Whether `encode` needs a retrieval context (`retrieval_context`) next to the presence:
    #: such a strategy is fitted on the training split's frozen embeddings (`fit_retrieval`).
    retrieves: ClassVar[bool] = False
    #: Whether the constructor takes the task's ``num_labels`` (a strategy that reads its
    #: neighbours' labels sizes its layers by it); `build_strategy` passes it to such classes.
    takes_num_labels: ClassVar[bool] = False

    def supports(self, backbone: Backbone, modality: Modality) -> bool:
        """Whether this strategy can act on `modality`'s tower (prompts need blocks)."""
        return backbone.num_layers(modality) > 0

    def adapts(self, modality: Modality) -> bool:
        """Whether `modality`'s tower output depends on this strategy (else it can be cached)."""
        return Modality.parse(modality) in self.towers

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters this strategy trains."""
        return [p for p in self.parameters() if p.requires_grad]

    def prompts(self, modality: Modality, presence: torch.Tensor) -> LayerPrompts | None:
        """The prompts for `modality`'s tower for a batch with this presence (None: none)."""
        del modality, presence
        return None

    def prepare_inputs(self, presence: torch.Tensor) -> dict[Modality, LayerPrompts | None]:
        """The prompts of every adapted tower for a batch with this presence."""
        return {m: self.prompts(m, presence) for m in self.towers}

    def fit_retrieval(
        self,
        embeddings: Mapping[Modality, torch.Tensor],
        presence: torch.Tensor,
        ids: Sequence[str],
        *,
        groups: Sequence[str] | None = None,
        labels: torch.Tensor | None = None,
    ) -> None:
        """Index the training split's frozen embeddings (a no-op unless `retrieves`).

        Args:
            embeddings: modality -> (n, dim) frozen (unadapted) embeddings, absent rows zero.
            presence: bool (n, 3) in `MODALITY_ORDER`.
            ids: the n sample ids.
            groups: optional n group names: rows that share an input (the questions about one
                image) share a group, and a training row never retrieves its own group, as a
                test row never finds its own input in the index.
            labels: optional n targets (class indices, multi-hot rows or 0/1 values), for a
                strategy that reads its neighbours' labels.
        """
        del embeddings, presence, ids, groups, labels

    def retrieval_context(
        self,
        embeddings: Mapping[Modality, torch.Tensor],
        presence: torch.Tensor,
        exclude_groups: Sequence[str | None] | None = None,
    ) -> torch.Tensor | None:
        """The per-row context `encode` needs (None unless `retrieves`).

        Args:
            embeddings: modality -> (batch, dim) frozen embeddings of the rows, absent rows zero.
            presence: bool (batch, 3) in `MODALITY_ORDER`.
            exclude_groups: per row, the group (see `fit_retrieval`) whose entries it must not
                retrieve: its own, for rows of the data the index was fitted on. Fitted
                without groups, a row's group is its id (leave-one-out).
        """
        del embeddings, presence, exclude_groups
        return None

    def encode(
        self,
        backbone: Backbone,
        modality: Modality,
        inputs: dict[str, torch.Tensor],
        presence: torch.Tensor,
        context: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """Run `modality`'s tower for a batch with this presence, with the strategy applied.

        `context` is `retrieval_context`'s output for the same rows (only strategies that
        `retrieve` read it).
        """
        del context
        prompts = self.prompts(modality, presence) if self.adapts(modality) else None
        return backbone.encode(modality, inputs, prompts)

    def save_files(self, directory: Any) -> None:
        """Write this strategy's weights into `directory` (a folder being built atomically)."""
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / "strategy.safetensors"))

    def load_files(self, directory: Any) -> None:
        """Read the weights written by `save_files`."""
        from safetensors.torch import load_file

        path = directory / "strategy.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no strategy weights")
        self.load_state_dict(load_file(str(path)))


@register_strategy("none", module="mllm_missing.strategies.base:NoStrategy")
@dataclass
class NoStrategyConfig(StrategyConfig):
    """No strategy: the frozen backbone as it is (absent inputs zero-filled); the baseline."""


class NoStrategy(Strategy):
    """The frozen backbone untouched: every tower is cacheable."""

    def supports(self, backbone: Backbone, modality: Modality) -> bool:
        """Acts on no tower."""
        del backbone, modality
        return False


def build_strategy(
    config: StrategyConfig,
    backbone: Backbone,
    modalities: Sequence[Modality | str],
    *,
    num_labels: int | None = None,
) -> Strategy:
    """Build the strategy of `config` for `backbone` over the dataset's `modalities`
    (`num_labels`, the task's label count, reaches the strategies that `takes_num_labels`)."""
    module_name, _, attr = config.module.partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    parsed = [Modality.parse(m) for m in modalities]
    strategy: Strategy
    if cls.takes_num_labels:
        strategy = cls(config, backbone, parsed, num_labels=num_labels)
    else:
        strategy = cls(config, backbone, parsed)
    return strategy
