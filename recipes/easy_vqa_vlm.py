"""Recipe: a small real MLLM on easy-VQA: SmolLM2 reads EfficientNet-Lite0 features.

Trains the projector and the learned missing-image tokens (the LM stays frozen) with image
dropout, then scores answer accuracy over the 13 answers on a fixed test subset with the image
present, absent (missing tokens), absent with the MissRAG status line instead, and for reference
the untrained projector and text-only SmolLM2. The two image-absent options are also scored on
``choice_val_size`` held-out train questions (``val`` in results.json): `mllm-missing chat --vlm`
picks its prompt by those, not by test scores. Run from the repository root::

    .venv/bin/python recipes/easy_vqa_vlm.py \
        recipes/configs/easy_vqa/smollm2-efficientnet_projector.yaml [key=value ...] [--resume]

e.g. ``train_size=500 test_size=200``. ``--resume`` continues an interrupted run, or adds what
a finished one lacks (new conditions, the validation scores) without training it again. Writes
``output_dir/results.json`` (with the config) and ``output_dir/best/`` (projector + missing
tokens; load with `MissingAwareVLM.from_pretrained`).
"""

from __future__ import annotations

import logging
import sys

from mllm_missing.config import load_config
from mllm_missing.errors import MllmMissingError
from mllm_missing.training.vlm import VLMTrainConfig, run_vlm_training


def main(cfg: VLMTrainConfig, resume: bool = False) -> None:
    """Train `cfg`, print the test and validation accuracies."""
    results = run_vlm_training(cfg, resume=resume)
    for split in ("test", "val"):
        for condition, row in results[split].items():
            print(f"{split} {condition}: accuracy {row['accuracy']:.4f} "
                  f"({row['questions']} questions)")  # fmt: skip


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
