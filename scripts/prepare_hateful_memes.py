"""Build and cache the five Hateful Memes splits from the official release, and report counts.

Run from the repository root (with the package installed)::

    python scripts/prepare_hateful_memes.py /data/hateful_memes [--on-error stop|skip] \
        [--cache-dir DIR]

ROOT is the folder holding ``train.jsonl``, ``dev_seen.jsonl``, ``dev_unseen.jsonl``,
``test_seen.jsonl``, ``test_unseen.jsonl`` and ``img/``. Exits with status 1 and the error
message (no traceback) when a file is missing or malformed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mllm_missing.data.base import skipped_records
from mllm_missing.data.hateful_memes import prepare_hateful_memes
from mllm_missing.errors import ConfigError, DataFormatError


def main(argv: list[str] | None = None) -> int:
    """Parse `argv`, build every split and print one line per split; returns the exit status."""
    parser = argparse.ArgumentParser(description="Build and cache the Hateful Memes splits.")
    parser.add_argument("root", type=Path, help="folder holding the split .jsonl files and img/")
    parser.add_argument(
        "--on-error",
        choices=("stop", "skip"),
        default="stop",
        help="stop at the first bad record (default) or skip bad records",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache root (default: $MLLM_MISSING_CACHE or ~/.cache/mllm_missing)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        splits = prepare_hateful_memes(args.root, on_error=args.on_error, cache_dir=args.cache_dir)
    except (DataFormatError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, dataset in splits.items():
        skipped = len(skipped_records(dataset))
        labels = "labelled" if "label" in dataset.column_names else "no labels"
        print(f"{name}: {len(dataset)} samples ({labels}), {skipped} bad records skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
