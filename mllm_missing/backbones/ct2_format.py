"""Reader of CTranslate2's ``model.bin`` format: named variables with shapes, dtypes and scales.

CTranslate2's ``model.bin`` (binary versions 4 to 6, see ``ctranslate2/specs/model_spec.py``),
little-endian::

    u32 binary_version; str spec_name; u32 spec_revision
    u32 n_variables, then per variable:
        str name; u8 rank; u32 dims[rank]; u8 dtype_id; u32 n_bytes; n_bytes of data
    u32 n_aliases, then per alias: str alias; str target_name

where ``str`` is a u16 length (counting a trailing NUL) followed by the UTF-8 bytes and the NUL,
and dtype ids are float32, int8, int16, int32, float16, bfloat16 in that order. Quantized weights
(int8 per output row, int16 per tensor) carry a ``<name>_scale`` variable: real = stored / scale.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mllm_missing.errors import DataFormatError

__all__ = ["CT2Checkpoint", "read_ct2_checkpoint"]

_SUPPORTED_BINARY_VERSIONS = (4, 5, 6)
_CT2_DTYPES = (torch.float32, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16)


@dataclass
class CT2Checkpoint:
    """The variables of a CTranslate2 ``model.bin``, as stored (quantized weights not yet scaled).

    Attributes:
        path: the file read.
        binary_version: the format version in the header.
        spec: the model specification name (``"WhisperSpec"`` for Whisper).
        revision: the specification revision.
        variables: name -> tensor, in the stored dtype.
        aliases: alias name -> the variable it shares storage with.
    """

    path: Path
    binary_version: int
    spec: str
    revision: int
    variables: dict[str, torch.Tensor] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def resolve(self, name: str) -> str:
        """The variable name `name` refers to (itself, or the target of an alias)."""
        return self.aliases.get(name, name)

    def has(self, name: str) -> bool:
        """Whether `name` is a variable or an alias of one."""
        return self.resolve(name) in self.variables

    def weight(self, name: str) -> torch.Tensor:
        """Variable `name` as float32, dequantized when it is stored with a ``_scale``."""
        real = self.resolve(name)
        if real not in self.variables:
            raise DataFormatError(f"{self.path}: variable {name!r} is missing")
        value = self.variables[real]
        scale = self.variables.get(real + "_scale")
        if value.dtype in (torch.int8, torch.int16):
            if scale is None:
                raise DataFormatError(
                    f"{self.path}: variable {real!r} is {value.dtype} but has no {real}_scale"
                )
            scale = scale.float()
            # int8 scales are per output row; int16 has one scale for the tensor.
            scale = scale.reshape(-1, *([1] * (value.dim() - 1))) if scale.dim() else scale
            return value.float() / scale
        return value.float()

    def scalar(self, name: str) -> int:
        """A scalar flag or count (e.g. ``decoder/num_heads``) as an int."""
        value = self.variables.get(self.resolve(name))
        if value is None or value.numel() != 1:
            raise DataFormatError(f"{self.path}: scalar variable {name!r} is missing")
        return int(value.reshape(()).item())


class _Reader:
    """Bounds-checked little-endian reads from a byte buffer, naming the file on truncation."""

    def __init__(self, data: bytes, path: Path):
        self.data = data
        self.path = path
        self.offset = 0

    def take(self, size: int, what: str) -> bytes:
        end = self.offset + size
        if size < 0 or end > len(self.data):
            raise DataFormatError(
                f"{self.path}: truncated CTranslate2 model at byte {self.offset} while reading {what}"
            )
        chunk = self.data[self.offset : end]
        self.offset = end
        return chunk

    def unpack(self, fmt: str, what: str) -> int:
        (value,) = struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))
        return int(value)

    def string(self, what: str) -> str:
        raw = self.take(self.unpack("H", what), what)
        if not raw or raw[-1] != 0:
            raise DataFormatError(f"{self.path}: malformed string while reading {what}")
        return raw[:-1].decode("utf-8")


def read_ct2_checkpoint(path: str | Path) -> CT2Checkpoint:
    """Parse a CTranslate2 ``model.bin`` (a file, or the model folder holding it).

    Args:
        path: the ``model.bin`` file or its folder.

    Raises:
        DataFormatError: the file is missing, truncated, of an unknown binary version or holds an
            unknown dtype; the message names the file (and the variable, where there is one).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    if not path.is_file():
        raise DataFormatError(f"CTranslate2 model file not found: {path}")
    reader = _Reader(path.read_bytes(), path)
    version = reader.unpack("I", "the binary version")
    if version not in _SUPPORTED_BINARY_VERSIONS:
        raise DataFormatError(
            f"{path}: CTranslate2 binary version {version} is not supported "
            f"(supported: {', '.join(map(str, _SUPPORTED_BINARY_VERSIONS))})"
        )
    checkpoint = CT2Checkpoint(
        path=path,
        binary_version=version,
        spec=reader.string("the spec name"),
        revision=reader.unpack("I", "the spec revision"),
    )
    for index in range(reader.unpack("I", "the variable count")):
        name = reader.string(f"the name of variable {index}")
        rank = reader.unpack("B", name)
        shape = [reader.unpack("I", name) for _ in range(rank)]
        type_id = reader.unpack("B", name)
        if type_id >= len(_CT2_DTYPES):
            raise DataFormatError(f"{path}: variable {name!r} has unknown dtype id {type_id}")
        dtype = _CT2_DTYPES[type_id]
        raw = reader.take(reader.unpack("I", name), f"the data of {name!r}")
        expected = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).itemsize
        if len(raw) != expected:
            raise DataFormatError(
                f"{path}: variable {name!r} holds {len(raw)} bytes; shape {shape} of {dtype} "
                f"needs {expected}"
            )
        tensor = (
            torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        )
        checkpoint.variables[name] = tensor.reshape(shape)
    for _ in range(reader.unpack("I", "the alias count")):
        alias = reader.string("an alias name")
        checkpoint.aliases[alias] = reader.string(f"the target of alias {alias!r}")
    if reader.offset != len(reader.data):
        raise DataFormatError(f"{path}: {len(reader.data) - reader.offset} trailing bytes")
    return checkpoint
