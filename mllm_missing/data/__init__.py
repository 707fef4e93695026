"""Dataset loaders: MM-IMDb, Hateful Memes, easy-VQA and a generic manifest for a user's own data.

Each loader returns a Hugging Face `datasets.Dataset` (see `mllm_missing.data.base` for the
column conventions) and is registered here by name, lazily.
"""

from __future__ import annotations

from typing import Any

from mllm_missing.registry import Registry

#: name -> loader function `load(root, split, **options) -> datasets.Dataset`.
DATASETS: Registry[Any] = Registry("dataset")
DATASETS.register_lazy("mmimdb", "mllm_missing.data.mmimdb:load_mmimdb")
DATASETS.register_lazy("hateful_memes", "mllm_missing.data.hateful_memes:load_hateful_memes")
DATASETS.register_lazy("easy_vqa", "mllm_missing.data.easy_vqa:load_easy_vqa")
DATASETS.register_lazy("manifest", "mllm_missing.data.manifest:load_manifest")

__all__ = ["DATASETS"]
