"""Recipe: train a strategy + head over a frozen backbone from a YAML config.

Run from the repository root::

    .venv/bin/python recipes/train.py recipes/configs/easy_vqa/offline-default_map_prompts.yaml \
        [key=value ...] [--resume]

e.g. ``epochs=3 strategy.prompt_length=8``. Same job as ``mllm-missing train CONFIG ...``.
"""

from __future__ import annotations

import logging
import sys

from mllm_missing.errors import MllmMissingError
from mllm_missing.training.config import TrainConfig, load_train_config
from mllm_missing.training.supervised import run_training


def main(cfg: TrainConfig, resume: bool = False) -> None:
    """Train `cfg`, print the test rows."""
    results = run_training(cfg, resume=resume)
    for row in results["test"]:
        print(f"{row['missing']}: {results['metric']} {row['metrics'][results['metric']]:.4f}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = [a for a in sys.argv[1:] if a != "--resume"]
    if not args:
        sys.exit(__doc__)
    try:
        config = load_train_config(args[0], args[1:])
    except MllmMissingError as exc:
        sys.exit(f"error: {exc}")
    main(config, resume="--resume" in sys.argv)
