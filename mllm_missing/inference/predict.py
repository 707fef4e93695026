"""`mllm-missing predict`: a trained checkpoint over a dataset split or a JSONL of requests.

A request line is a JSON object with an optional ``id`` and any of ``image`` (a path), ``text``
and ``audio`` (a path); relative paths are read from the JSONL file's folder, and a field that
is absent, null or blank is a missing modality. Each output line holds ``id``, ``presence``,
``modules`` and ``prediction`` (label name(s) and scores; see `Prediction.to_row`). A bad line
(not JSON, every modality missing, an unreadable file, a modality the model cannot read) stops
the run with an error naming the file and line, or with ``on_error="skip"`` is written as an
``{"id", "line", "error"}`` row instead.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mllm_missing.data.base import OnError
from mllm_missing.errors import ConfigError, DataFormatError
from mllm_missing.types import Modality, Presence, Sample, is_empty_payload

__all__ = ["RequestError", "load_checkpoint", "read_requests", "run_predict"]

logger = logging.getLogger(__name__)

_FIELDS = ("image", "text", "audio")
DATASETS = ("easy_vqa", "mmimdb", "hateful_memes")


@dataclass
class RequestError:
    """A request that could not be read (kept when skipping bad lines)."""

    line: int
    id: str
    error: str


@dataclass
class Requests:
    """Readable requests and the lines skipped."""

    samples: list[Sample] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    errors: list[RequestError] = field(default_factory=list)


def _read_payload(modality: str, value: Any, folder: Path, where: str) -> Any:
    if modality == "text":
        if not isinstance(value, str):
            raise DataFormatError(f"{where}: text must be a string; got {type(value).__name__}")
        return value
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: {modality} must be a file path; got {value!r}")
    path = Path(value) if Path(value).is_absolute() else folder / value
    if modality == "image":
        from PIL import Image

        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (OSError, ValueError) as exc:
            raise DataFormatError(f"{where}: image {path}: cannot read it ({exc})") from None
    from mllm_missing.backbones.audio import load_audio

    try:
        return load_audio(path)
    except (OSError, ValueError, RuntimeError) as exc:
        raise DataFormatError(f"{where}: audio {path}: cannot read it ({exc})") from None


def _parse_line(text: str, number: int, path: Path) -> Sample:
    where = f"{path}:{number}"
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: a request must be a JSON object")
    ident = str(record.get("id", f"line-{number}"))
    given = {m: record.get(m) for m in _FIELDS if not is_empty_payload(record.get(m))}
    if not given:
        raise DataFormatError(
            f"{where}: every modality is missing (give at least one of image, text, audio)"
        )
    payloads = {
        Modality(m): _read_payload(m, v, path.parent, f"{where} ({m})") for m, v in given.items()
    }
    return Sample(Presence(frozenset(payloads)), payloads, id=ident)


def read_requests(path: str | Path, on_error: str | OnError = OnError.STOP) -> Requests:
    """Read a JSONL file of requests (format in the module docstring).

    Raises:
        DataFormatError: the file is missing, or (``on_error="stop"``) a line is bad; the
            message names the file and line.
    """
    file = Path(path)
    policy = OnError.parse(on_error)
    if not file.is_file():
        raise DataFormatError(f"{file}: no such requests file")
    out = Requests()
    with file.open(encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                out.samples.append(_parse_line(text, number, file))
                out.lines.append(number)
            except DataFormatError as exc:
                if policy is OnError.STOP:
                    raise
                out.errors.append(RequestError(number, f"line-{number}", str(exc)))
    return out


def load_checkpoint(
    directory: str | Path,
    *,
    device: str = "auto",
    quantization: str | None = None,
    backbone: Any = None,
) -> Any:
    """A trained `MissingModalityModel` from a training output folder or its ``best/``.

    Args:
        directory: the folder holding ``model_config.json`` (or whose ``best/`` does).
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        quantization: bitsandbytes mode for the backbone's LLM (``nf4``, ...; hf_causal presets);
            default: the one the checkpoint was trained with.
        backbone: an already built frozen backbone to use instead of the preset's.

    Raises:
        DataFormatError: no saved model in the folder.
    """
    from mllm_missing.model import MODEL_CONFIG, MissingModalityModel
    from mllm_missing.training.supervised import load_backbone, resolve_device

    folder = Path(directory)
    if not (folder / MODEL_CONFIG).is_file() and (folder / "best" / MODEL_CONFIG).is_file():
        folder = folder / "best"
    if not (folder / MODEL_CONFIG).is_file():
        raise DataFormatError(f"{directory}: no {MODEL_CONFIG} in it or in its best/")
    spec = json.loads((folder / MODEL_CONFIG).read_text(encoding="utf-8"))
    target = resolve_device(device)
    if backbone is None:
        training = spec.get("training", {})
        # a QLoRA checkpoint reloads on the quantized backbone it was trained on
        mode = training.get("quantization", "none") if quantization is None else quantization
        backbone = load_backbone(
            spec["backbone"],
            weights=training.get("backbone_weights"),
            image_size=int(training.get("image_size", 128)),
            device=target,
            quantization=str(mode),
        )
    return MissingModalityModel.from_pretrained(folder, backbone=backbone).to(target)


def dataset_samples(
    dataset: str,
    split: str,
    *,
    data_root: str | None = None,
    missing: str | None = None,
    seed: int = 0,
    mask_root: str | Path = "masks",
    limit: int | None = None,
    cache_dir: str | None = None,
) -> list[Sample]:
    """The samples of a dataset split, every modality present or under a seeded missing setting.

    Raises:
        ConfigError: an unknown dataset, or MM-IMDb / Hateful Memes without `data_root`.
    """
    import numpy as np

    from mllm_missing.missing import MissingConfig, get_mask_table

    if dataset not in DATASETS:
        raise ConfigError(f"dataset must be one of {', '.join(DATASETS)}; got {dataset!r}")
    if dataset != "easy_vqa" and not data_root:
        raise ConfigError(f"dataset {dataset}: give --data-root (the official files' folder)")
    if dataset == "easy_vqa":
        from mllm_missing.data.easy_vqa import TASK, load_easy_vqa

        data, task = load_easy_vqa(split=split, cache_dir=cache_dir), TASK
    elif dataset == "mmimdb":
        from mllm_missing.data.mmimdb import TASK as MMIMDB
        from mllm_missing.data.mmimdb import load_mmimdb

        data, task = load_mmimdb(str(data_root), split, cache_dir=cache_dir), MMIMDB
    else:
        from mllm_missing.data.hateful_memes import TASK as MEMES
        from mllm_missing.data.hateful_memes import load_hateful_memes

        data, task = load_hateful_memes(str(data_root), split, cache_dir=cache_dir), MEMES
    if limit:
        data = data.select(range(min(limit, len(data))))
    ids = [str(i) for i in data["id"]]
    present = np.ones((len(ids), 3), dtype=bool)
    if missing:
        table = get_mask_table(
            MissingConfig.parse(missing, seed=seed), task.name, split, ids, task.modalities,
            mask_root,
        )  # fmt: skip
        present = table.presence_tensor_rows()
    samples = []
    for row, ident in enumerate(ids):
        record = data[row]
        flags = Presence.from_flags(present[row])
        have = [m for m in task.modalities if m in flags]
        samples.append(
            Sample(Presence(frozenset(have)), {m: record[m.value] for m in have}, id=ident)
        )
    return samples


def run_predict(
    engine: Any,
    samples: Sequence[Sample],
    output: str | Path,
    *,
    errors: Sequence[RequestError] = (),
    lines: Sequence[int] = (),
    on_error: str | OnError = OnError.STOP,
) -> dict[str, int]:
    """Predict `samples` with `engine` and write one JSON row per request to `output`
    (atomically), skipped requests as error rows in line order.

    Returns:
        ``{"predicted": n, "skipped": m}``.
    """
    from mllm_missing.atomic import atomic_write_text

    policy = OnError.parse(on_error)
    keep: list[Sample] = []
    kept_lines: list[int] = []
    skipped = list(errors)
    for i, sample in enumerate(samples):
        line = lines[i] if i < len(lines) else i + 1
        try:
            engine.check(sample)
        except ConfigError as exc:
            if policy is OnError.STOP:
                raise ConfigError(f"line {line}: {exc}") from None
            skipped.append(RequestError(line, sample.id, str(exc)))
            continue
        keep.append(sample)
        kept_lines.append(line)
    rows = engine.predict_rows(keep)
    ordered: list[tuple[int, dict[str, Any]]] = list(zip(kept_lines, rows))
    ordered += [(e.line, {"id": e.id, "line": e.line, "error": e.error}) for e in skipped]
    ordered.sort(key=lambda pair: pair[0])
    text = "".join(json.dumps(row) + "\n" for _, row in ordered)
    atomic_write_text(output, text)
    return {"predicted": len(rows), "skipped": len(skipped)}
