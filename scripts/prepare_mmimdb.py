"""Validate and cache every MM-IMDb split from the official files, and report the counts.

Run from the repository root (with the package installed)::

    python scripts/prepare_mmimdb.py ROOT [--text-mode movie|plot] [--on-error stop|skip] [--cache-dir DIR]

ROOT holds ``split.json`` and ``dataset/``. Same as ``mllm-missing prepare mmimdb ROOT ...``: a missing or malformed file
is reported by name (exit status 2, no traceback); with ``--on-error skip`` bad records are
skipped and counted per split.
"""

from __future__ import annotations

import sys

from mllm_missing.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", "mmimdb", *sys.argv[1:]]))
