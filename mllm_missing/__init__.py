"""mllm_missing: make frozen multimodal foundation models work when a modality is missing.

Importing the package is cheap: heavy optional dependencies (open_clip, bitsandbytes, vllm) load
only when the feature that needs them is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Batch": "mllm_missing.types",
    "MissingConfig": "mllm_missing.missing",
    "Modality": "mllm_missing.types",
    "Presence": "mllm_missing.types",
    "Sample": "mllm_missing.types",
    "get_mask_table": "mllm_missing.missing",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mllm_missing' has no attribute {name!r}")
