"""A frozen backbone + a strategy + imputation/fusion/head: the model every recipe trains.

Towers the strategy adapts run on every row: absent rows get a placeholder input (a one-character text,
a grey image) so the strategy's prompts or adapters for that missing case still shape the
output (MAP's practice). Towers it does not adapt are frozen functions of their input, so their
embeddings are computed once per distinct input, and absent rows are filled by the imputation.
`save_pretrained` writes the strategy and head (never the frozen backbone); `from_pretrained`
rebuilds them on a backbone preset.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mllm_missing.atomic import atomic_directory
from mllm_missing.backbones.base import Backbone
from mllm_missing.data.base import TaskType
from mllm_missing.errors import DataFormatError
from mllm_missing.heads import ClassificationHead, EmbeddingClassifier, PatternRoutedHead
from mllm_missing.strategies.base import (
    Strategy,
    build_strategy,
    strategy_config_from_dict,
)
from mllm_missing.strategies.fusion import FusionConfig, build_fusion
from mllm_missing.strategies.imputation import ImputationConfig, build_imputation
from mllm_missing.types import MODALITY_ORDER, Modality

__all__ = ["MissingModalityModel", "build_model"]

MODEL_CONFIG = "model_config.json"
HEAD_WEIGHTS = "head.safetensors"


class MissingModalityModel(nn.Module):
    """Strategy + classifier over a frozen backbone (which is held, not owned: it is no
    submodule, so `state_dict` and `parameters` are the trainable parts only).

    Args:
        backbone: the frozen backbone.
        strategy: the strategy applied to its towers.
        classifier: imputation -> fusion -> head over per-modality embeddings.
        modalities: the dataset's modalities.
        spec: the JSON-ready settings that rebuild this model (written by `save_pretrained`).
    """

    def __init__(
        self,
        backbone: Backbone,
        strategy: Strategy,
        classifier: EmbeddingClassifier,
        modalities: Sequence[Modality],
        spec: Mapping[str, Any],
    ) -> None:
        super().__init__()
        self._backbone = [backbone]  # a list hides it from nn.Module's registration
        self.strategy = strategy
        self.classifier = classifier
        self.modalities = tuple(Modality.parse(m) for m in modalities)
        self.spec = dict(spec)

    @property
    def backbone(self) -> Backbone:
        """The frozen backbone."""
        return self._backbone[0]

    def adapted(self) -> list[Modality]:
        """The dataset modalities whose tower output depends on the strategy."""
        return [m for m in self.modalities if self.strategy.adapts(m)]

    def encode(
        self,
        modality: Modality,
        inputs: dict[str, torch.Tensor],
        presence: torch.Tensor,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pooled (batch, dim) embeddings of one tower for rows with this presence (and, for a
        strategy that retrieves, the rows' retrieval context)."""
        output = self.strategy.encode(self.backbone, modality, inputs, presence, context)
        return output.pooled.float()

    def forward(
        self,
        embeddings: Mapping[Modality, torch.Tensor],
        presence: torch.Tensor,
        exclude_groups: Sequence[str | None] | None = None,
    ) -> torch.Tensor:
        """Logits from per-modality embeddings.

        Args:
            embeddings: modality -> (batch, dim). For adapted towers every row is the tower's
                output (placeholder inputs on absent rows); for the others absent rows must be
                zero and are filled by the imputation.
            presence: bool (batch, 3) in `MODALITY_ORDER`.
            exclude_groups: rows of the data the imputation was fitted on: each row's group,
                which a retrieving imputation must not draw neighbours from (see `Imputation`).
        """
        adapted = self.adapted()
        zeroed = {
            m: x * presence[:, MODALITY_ORDER.index(m)].unsqueeze(1) if m in adapted else x
            for m, x in embeddings.items()
        }
        filled = self.classifier.imputation(zeroed, presence, exclude_groups)
        filled.update({m: embeddings[m] for m in adapted})
        return self.classifier.head(self.classifier.fusion(filled, presence), presence)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Strategy and classifier parameters (the backbone's are frozen)."""
        return [p for p in self.parameters() if p.requires_grad]

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the strategy and head into `directory` atomically (the backbone is not saved).

        Files: ``model_config.json``, ``head.safetensors`` and the strategy's own files (for
        LoRA, peft's ``adapter_config.json`` + ``adapter_model.safetensors``).
        """
        with atomic_directory(directory) as folder:
            self.write_files(folder)
        return Path(directory)

    def write_files(self, folder: Path) -> None:
        """Write the files of `save_pretrained` into an existing (temporary) folder."""
        from safetensors.torch import save_file

        folder = Path(folder)
        (folder / MODEL_CONFIG).write_text(json.dumps(self.spec, indent=2), encoding="utf-8")
        state = {k: v.detach().contiguous().cpu() for k, v in self.classifier.state_dict().items()}
        save_file(state, str(folder / HEAD_WEIGHTS))
        self.classifier.imputation.save_files(folder)
        self.strategy.save_files(folder)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, backbone: Backbone | None = None, **backbone_options: Any
    ) -> MissingModalityModel:
        """Rebuild a saved model; the backbone comes from its preset unless one is given."""
        folder = Path(directory)
        path = folder / MODEL_CONFIG
        if not path.is_file():
            raise DataFormatError(f"{path}: not found; is {folder} a saved mllm-missing model?")
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{path}: not valid JSON ({exc})") from None
        if backbone is None:
            from mllm_missing.backbones.presets import get_backbone

            backbone = get_backbone(spec["backbone"], **backbone_options)
        model = build_model(spec, backbone, {Modality(k): v for k, v in spec["dims"].items()})
        model.load_weights(folder)
        return model

    def load_weights(self, directory: str | Path) -> None:
        """Load saved strategy and head weights into this model (same settings)."""
        from safetensors.torch import load_file

        folder = Path(directory)
        head = folder / HEAD_WEIGHTS
        if not head.is_file():
            raise DataFormatError(f"{head}: not found")
        self.strategy.load_files(folder)
        self.classifier.load_state_dict(load_file(str(head)))
        self.classifier.imputation.load_files(folder)


def build_model(
    spec: Mapping[str, Any], backbone: Backbone, dims: Mapping[Modality, int]
) -> MissingModalityModel:
    """Build the model a spec describes.

    Args:
        spec: ``backbone`` (preset name), ``strategy`` (config dict with ``method``),
            ``imputation``, ``fusion``, ``hidden_size``, ``routed_head``, ``task_type``,
            ``num_labels``, ``modalities`` (names).
        backbone: the frozen backbone.
        dims: embedding width of each dataset modality.
    """
    modalities = [Modality.parse(m) for m in spec["modalities"]]
    strategy = build_strategy(
        strategy_config_from_dict(spec["strategy"]), backbone, modalities,
        num_labels=spec["num_labels"],
    )  # fmt: skip
    imputation = build_imputation(ImputationConfig(method=spec.get("imputation", "zero")), dims)
    fusion_config = FusionConfig(
        method=spec.get("fusion", "concat"), hidden_size=spec["hidden_size"]
    )
    fusion = build_fusion(fusion_config, dims)
    head: ClassificationHead | PatternRoutedHead
    if spec.get("routed_head", False):
        head = PatternRoutedHead(
            fusion.out_dim, spec["num_labels"], modalities, spec["hidden_size"]
        )
    else:
        head = ClassificationHead(fusion.out_dim, spec["num_labels"], spec["hidden_size"])
    TaskType(spec["task_type"])
    full_spec = {
        **dict(spec),
        "strategy": strategy.config.to_dict(),
        "fusion_config": asdict(fusion_config),
        "dims": {m.value: int(d) for m, d in dims.items()},
    }
    classifier = EmbeddingClassifier(imputation, fusion, head)
    return MissingModalityModel(backbone, strategy, classifier, modalities, full_spec)
