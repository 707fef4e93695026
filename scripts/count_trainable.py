"""Trainable parameters of every CLIP ViT-B/16 recipe, as a share of the frozen backbone.

Builds ViT-B/16 from its open_clip config (random weights: the counts do not depend on them,
and no download is needed), then each MM-IMDb recipe's strategy and head, and prints the
strategy's and the strategy + head's share of the backbone's parameters.

Run: ``.venv/bin/python scripts/count_trainable.py`` (needs the ``clip`` extra).
"""

from __future__ import annotations

import logging
from pathlib import Path

from mllm_missing.backbones.clip import load_clip
from mllm_missing.data.mmimdb import TASK
from mllm_missing.model import build_model
from mllm_missing.training.config import load_train_config

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "mmimdb"


def main() -> None:
    """Print one markdown row per recipe."""
    logging.basicConfig(level=logging.WARNING)
    print("| recipe | strategy params | share | strategy + head | share |")
    print("|---|---:|---:|---:|---:|")
    for path in sorted(RECIPES.glob("clip-vit-b-16_*.yaml")):
        config = load_train_config(path)
        backbone = load_clip("ViT-B-16-quickgelu", pretrained=None)
        frozen = sum(p.numel() for p in backbone.parameters())
        spec = {
            "backbone": config.backbone, "strategy": config.strategy, "imputation": "zero",
            "fusion": config.fusion, "hidden_size": config.hidden_size, "routed_head": False,
            "task": TASK.name, "task_type": TASK.task_type.value, "num_labels": TASK.num_labels,
            "modalities": [m.value for m in TASK.modalities],
        }  # fmt: skip
        dims = {m: backbone.embed_dim(m) for m in TASK.modalities}
        model = build_model(spec, backbone, dims)
        strategy = sum(p.numel() for p in model.strategy.trainable_parameters())
        total = sum(p.numel() for p in model.trainable_parameters())
        print(
            f"| {path.stem} | {strategy:,} | {100 * strategy / frozen:.3f} % | {total:,} | "
            f"{100 * total / frozen:.3f} % |"
        )
    print(f"\nfrozen CLIP ViT-B/16 parameters: {frozen:,}")


if __name__ == "__main__":
    main()
