"""Trainable LoRA parameters on CLIP ViT-B/16 (random weights) as a share of the backbone.

Run: ``.venv/bin/python scripts/count_trainable.py`` (needs the ``clip`` extra; no download).
"""

from __future__ import annotations

import logging

from mllm_missing.backbones.clip import load_clip
from mllm_missing.strategies.base import build_strategy, strategy_config_from_dict


def main() -> None:
    """Print r, routed, trainable LoRA parameters, frozen backbone parameters and the share."""
    logging.basicConfig(level=logging.WARNING)
    for r in (1, 8):
        for routed in (False, True):
            backbone = load_clip("ViT-B-16-quickgelu", pretrained=None)
            frozen = sum(p.numel() for p in backbone.parameters())
            config = strategy_config_from_dict({"method": "lora", "r": r, "routed": routed})
            strategy = build_strategy(config, backbone, ["image", "text"])
            trainable = sum(p.numel() for p in strategy.trainable_parameters())
            print(
                f"r={r} routed={routed}: trainable {trainable:,} / frozen {frozen:,} "
                f"= {100 * trainable / frozen:.3f}%"
            )


if __name__ == "__main__":
    main()
