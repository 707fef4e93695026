"""Validate and cache every Hateful Memes split from the official files, and report the counts.

Run from the repository root (with the package installed)::

    python scripts/prepare_hateful_memes.py ROOT [--on-error stop|skip] [--cache-dir DIR]

ROOT holds the five split ``.jsonl`` files and ``img/``. Same as ``mllm-missing prepare hateful_memes ROOT ...``: a missing or malformed file
is reported by name (exit status 2, no traceback); with ``--on-error skip`` bad records are
skipped and counted per split.
"""

from __future__ import annotations

import sys

from mllm_missing.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", "hateful_memes", *sys.argv[1:]]))
