"""Recipe: heads over the frozen offline encoders on easy-VQA under missing modalities.

Run from the repository root::

    .venv/bin/python recipes/easy_vqa_heads.py recipes/configs/easy_vqa/offline_heads.yaml \
        [key=value ...]

e.g. ``epochs=5 train_missing=both:0.5``. Same job as ``mllm-missing quickstart --config ...``.
"""

from __future__ import annotations

import logging
import sys

from mllm_missing.config import load_config
from mllm_missing.errors import MllmMissingError
from mllm_missing.quickstart import QuickstartConfig, run_quickstart
from mllm_missing.report import summary_table


def main(cfg: QuickstartConfig) -> None:
    """Train the heads of `cfg`, evaluate them and print the table."""
    results = run_quickstart(cfg)
    print(summary_table(results))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    try:
        config = load_config(QuickstartConfig, sys.argv[1], sys.argv[2:])
    except MllmMissingError as exc:
        sys.exit(f"error: {exc}")
    main(config)
