"""Reads a GGUF file's metadata and maps its tensors, without copying them.

gguf-py's `GGUFReader` builds a numpy view per array element while it parses: the embedded
SmolLM2's 49152 tokens and 48900 merges took ~7 s of every start that way. This reads the same
layout (GGUF v2/v3, little-endian) with one pass over the header bytes and `np.frombuffer` for
numeric arrays (~0.1 s). Tensor data is a read-only memory map shaped as gguf-py shapes it, so
`pie.engine.gguf_tensors.dequantize` takes it; the quantization tables are gguf-py's.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from pie.engine.errors import ModelLoadError

_MAGIC = b"GGUF"
_STRING, _ARRAY = 8, 9
# value type -> numpy dtype (little-endian), for every scalar type of the format
_NUMERIC: dict[int, np.dtype[Any]] = {
    0: np.dtype("<u1"),
    1: np.dtype("<i1"),
    2: np.dtype("<u2"),
    3: np.dtype("<i2"),
    4: np.dtype("<u4"),
    5: np.dtype("<i4"),
    6: np.dtype("<f4"),
    7: np.dtype("?"),
    10: np.dtype("<u8"),
    11: np.dtype("<i8"),
    12: np.dtype("<f8"),
}
# tensor types stored as themselves (others, BF16 included, are mapped as bytes, as gguf-py does)
_PLAIN_TENSORS: dict[GGMLQuantizationType, type[np.generic]] = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # values, outermost first (ggml's dimensions reversed)
    data: np.ndarray  # read-only map: plain types [*shape]; block types uint8 [..., row bytes]


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    metadata: dict[str, Any]  # scalars as Python values; arrays of strings as lists of str,
    # numeric arrays as numpy arrays
    tensors: dict[str, GGUFTensor]


_U64 = struct.Struct("<Q")


class _Cursor:
    """Sequential little-endian reads from the file's bytes; errors name the byte offset."""

    def __init__(self, buffer: memoryview) -> None:
        self.buffer = buffer
        self.at = 0

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.at + size > len(self.buffer):
            raise ModelLoadError(f"GGUF header ends early (byte {self.at})")
        value = struct.unpack_from(fmt, self.buffer, self.at)[0]
        self.at += size
        return value

    def string(self) -> str:
        size = self.take("<Q")
        if self.at + size > len(self.buffer):
            raise ModelLoadError(f"GGUF string of {size} bytes runs past the file (byte {self.at})")
        raw = bytes(self.buffer[self.at : self.at + size])
        self.at += size
        return raw.decode("utf-8", errors="replace")

    def strings(self, count: int) -> list[str]:
        """`count` strings in a row, as `string` reads them, in one tight loop: a vocabulary
        holds ~50k-150k of them, and the general path took ~4 us each."""
        buffer, at, end_of_file = self.buffer, self.at, len(self.buffer)
        length = _U64.unpack_from
        out = []
        for _ in range(count):
            if at + 8 > end_of_file:
                raise ModelLoadError(f"GGUF header ends early (byte {at})")
            end = at + 8 + length(buffer, at)[0]
            if end > end_of_file:
                raise ModelLoadError(f"GGUF string runs past the file (byte {at + 8})")
            out.append(str(buffer[at + 8 : end], "utf-8", "replace"))
            at = end
        self.at = at
        return out

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.take("<I"), self.take("<Q")
            if item == _STRING:
                return self.strings(count)
            if item not in _NUMERIC:
                raise ModelLoadError(f"GGUF array of unknown type {item} (byte {self.at})")
            dtype = _NUMERIC[item]
            end = self.at + count * dtype.itemsize
            if end > len(self.buffer):
                raise ModelLoadError(f"GGUF array runs past the file (byte {self.at})")
            array = np.frombuffer(self.buffer[self.at : end], dtype=dtype).copy()
            self.at = end
            return array
        if kind not in _NUMERIC:
            raise ModelLoadError(f"GGUF value of unknown type {kind} (byte {self.at})")
        dtype = _NUMERIC[kind]
        value = np.frombuffer(self.buffer[self.at : self.at + dtype.itemsize], dtype=dtype)[0]
        self.at += dtype.itemsize
        return value.item()


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse `path`'s header and map its tensors; ModelLoadError if it is not a valid GGUF."""
    path = Path(path)
    try:
        mapped = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot map the file ({exc})") from exc
    cursor = _Cursor(mapped.data)
    if len(mapped) < 24 or bytes(mapped[:4]) != _MAGIC:
        raise ModelLoadError(f"{path}: not a GGUF file (no GGUF magic)")
    cursor.at = 4
    version = cursor.take("<I")
    if version not in (2, 3):
        raise ModelLoadError(
            f"{path}: GGUF version {version} is not supported (v2 and v3, little-endian)"
        )
    n_tensors, n_values = cursor.take("<Q"), cursor.take("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_values):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cursor.string()
        dims = [cursor.take("<Q") for _ in range(cursor.take("<I"))]
        kind, offset = cursor.take("<I"), cursor.take("<Q")
        infos.append((name, dims, kind, offset))
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 1:
        raise ModelLoadError(f"{path}: general.alignment {alignment!r} is not a positive integer")
    data_start = -(-cursor.at // alignment) * alignment
    tensors = {}
    for name, dims, kind, offset in infos:
        tensors[name] = _map_tensor(path, mapped, name, dims, kind, data_start + offset)
    return GGUFFile(path, metadata, tensors)


def _map_tensor(
    path: Path, mapped: np.ndarray, name: str, dims: list[int], kind: int, start: int
) -> GGUFTensor:
    try:
        qtype = GGMLQuantizationType(kind)
    except ValueError:
        raise ModelLoadError(f"{path}: tensor {name} has unknown type {kind}") from None
    shape = tuple(int(d) for d in reversed(dims))
    block_values, block_bytes = GGML_QUANT_SIZES[qtype]
    count = int(np.prod(shape)) if shape else 1
    if shape and shape[-1] % block_values:
        raise ModelLoadError(f"{path}: tensor {name} rows are not whole {qtype.name} blocks")
    nbytes = count // block_values * block_bytes
    if start + nbytes > len(mapped):
        raise ModelLoadError(f"{path}: tensor {name} runs past the end of the file")
    raw = mapped[start : start + nbytes]
    plain = _PLAIN_TENSORS.get(qtype)
    if plain is not None:
        data = raw.view(plain).reshape(shape)
    else:
        data = raw.reshape(*shape[:-1], shape[-1] // block_values * block_bytes)
    return GGUFTensor(name, qtype, shape, data)
