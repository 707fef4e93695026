"""Recipe: a small real MLLM on easy-VQA: SmolLM2 reads EfficientNet-Lite0 features.

Trains the projector and the learned missing-image tokens (the LM stays frozen) with image
dropout, then scores answer accuracy over the 13 answers on a fixed test subset with the image
present, absent (missing tokens), and for reference the untrained projector and text-only
SmolLM2. Run from the repository root::

    .venv/bin/python recipes/easy_vqa_vlm.py \
        recipes/configs/easy_vqa/smollm2-efficientnet_projector.yaml [key=value ...] [--resume]

e.g. ``train_size=500 test_size=200``. Writes ``output_dir/results.json`` (with the config) and
``output_dir/best/`` (projector + missing tokens; load with `MissingAwareVLM.from_pretrained`).
"""

from __future__ import annotations

import logging
import sys

from mllm_missing.config import load_config
from mllm_missing.errors import MllmMissingError
from mllm_missing.training.vlm import VLMTrainConfig, run_vlm_training


def main(cfg: VLMTrainConfig, resume: bool = False) -> None:
    """Train `cfg`, print the test accuracies."""
    results = run_vlm_training(cfg, resume=resume)
    for condition, row in results["test"].items():
        print(f"{condition}: accuracy {row['accuracy']:.4f} ({row['questions']} questions)")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = [a for a in sys.argv[1:] if a != "--resume"]
    if not args:
        sys.exit(__doc__)
    try:
        config = load_config(VLMTrainConfig, args[0], args[1:])
    except MllmMissingError as exc:
        sys.exit(f"error: {exc}")
    main(config, resume="--resume" in sys.argv)
