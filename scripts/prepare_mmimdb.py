"""Build and cache every MM-IMDb split from the official raw release, and report the counts.

Run from the repository root (with the package installed)::

    python scripts/prepare_mmimdb.py /data/mmimdb [--text-mode movie|plot] \
        [--on-error stop|skip] [--cache-dir DIR]

ROOT is the folder holding ``split.json`` and ``dataset/``. Exits with status 1 and the error
message (no traceback) when a file is missing or malformed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mllm_missing.data.base import skipped_records
from mllm_missing.data.mmimdb import TEXT_MODES, prepare_mmimdb
from mllm_missing.errors import ConfigError, DataFormatError


def main(argv: list[str] | None = None) -> int:
    """Parse `argv`, build every split and print one line per split; returns the exit status."""
    parser = argparse.ArgumentParser(description="Build and cache the MM-IMDb splits.")
    parser.add_argument("root", type=Path, help="folder holding split.json and dataset/")
    parser.add_argument(
        "--text-mode",
        choices=TEXT_MODES,
        default="movie",
        help="one sample per movie (default) or per (movie, plot) pair",
    )
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
        splits = prepare_mmimdb(
            args.root, text_mode=args.text_mode, on_error=args.on_error, cache_dir=args.cache_dir
        )
    except (DataFormatError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, dataset in splits.items():
        skipped = len(skipped_records(dataset))
        print(f"{name}: {len(dataset)} samples, {skipped} bad records skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
