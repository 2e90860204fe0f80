"""GGUF tensor data to float32 torch tensors, dequantized by torch ops (multi-threaded).

gguf-py's dequantizers are single-threaded numpy with several temporaries per block: loading
the embedded SmolLM2 (Q4_1 weights, Q8_0 embedding) took ~9 s that way, most of the time
`pie run` spends before its first token. The formats here are the ones GGUF models ship in
most (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1), computed with the same float32 operations
in the same order as gguf-py, so the values are bit-identical (the tests compare); any other
type (the K-quants, for one) goes to gguf-py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf.quants import dequantize as gguf_dequantize


def _half(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 at byte `at` of each block, as float32 [n, 1]."""
    return blocks[:, at : at + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes -> [n, 32] 4-bit values: all low nibbles, then all high ones (ggml order)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _fifth_bits(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """Bit j of the little-endian uint32 at byte `at`, as [n, 32] values 0 or 16."""
    qh = blocks[:, at : at + 4].to(torch.int64)
    word = qh[:, 0] | qh[:, 1] << 8 | qh[:, 2] << 16 | qh[:, 3] << 24
    bits = (word[:, None] >> torch.arange(32)) & 1
    return (bits << 4).to(torch.uint8)


def _q8_0(b: torch.Tensor) -> torch.Tensor:  # d: f16, 32 x int8
    return b[:, 2:].contiguous().view(torch.int8).float() * _half(b, 0)


def _q4_0(b: torch.Tensor) -> torch.Tensor:  # d, 16 bytes of nibbles; (q - 8) * d
    return _half(b, 0) * (_nibbles(b[:, 2:]).to(torch.int8) - 8).float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:  # d, m, nibbles; d * q + m
    return _half(b, 0) * _nibbles(b[:, 4:]).float() + _half(b, 2)


def _q5_0(b: torch.Tensor) -> torch.Tensor:  # d, 32 high bits, nibbles; (q - 16) * d
    q = (_nibbles(b[:, 6:]) | _fifth_bits(b, 2)).to(torch.int8) - 16
    return _half(b, 0) * q.float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:  # d, m, 32 high bits, nibbles; d * q + m
    q = _nibbles(b[:, 8:]) | _fifth_bits(b, 4)
    return _half(b, 0) * q.float() + _half(b, 2)


# type -> (bytes per block, values per block, block decoder [n, bytes] uint8 -> [n, values])
_BLOCKS: dict[QType, tuple[int, int, Callable[[torch.Tensor], torch.Tensor]]] = {
    QType.Q8_0: (34, 32, _q8_0),
    QType.Q4_0: (18, 32, _q4_0),
    QType.Q4_1: (20, 32, _q4_1),
    QType.Q5_0: (22, 32, _q5_0),
    QType.Q5_1: (24, 32, _q5_1),
}
_PLAIN = {QType.F32: torch.float32, QType.F16: torch.float16, QType.BF16: torch.bfloat16}


def dequantize(data: np.ndarray, qtype: QType) -> torch.Tensor:
    """A GGUF tensor's data (as GGUFReader maps it) as a new float32 tensor.

    Shapes follow gguf-py: block types (and BF16) come as uint8 [..., row bytes] and leave as
    [..., row bytes / block bytes * block values]; F32 and F16 keep their shape.
    """
    # A copy: the reader maps the file read-only, and torch wants memory it may write.
    raw = torch.from_numpy(np.array(data, copy=True))
    if qtype in _PLAIN:  # as stored, or as bytes (BF16): view() rescales the last dim
        return raw.view(_PLAIN[qtype]).float()
    if qtype not in _BLOCKS:
        return torch.from_numpy(np.array(gguf_dequantize(data, qtype), dtype=np.float32))
    block_bytes, values, decode = _BLOCKS[qtype]
    *rows, row_bytes = data.shape
    if row_bytes % block_bytes:
        raise ValueError(f"{qtype.name} rows of {row_bytes} bytes are not whole blocks")
    out = decode(raw.view(torch.uint8).reshape(-1, block_bytes))
    return out.reshape(*rows, row_bytes // block_bytes * values)


# Block types the float32 CPU kernels compute from directly (pie.engine.cpu_kernels_f32)
KERNEL_BLOCK_TYPES = (QType.Q4_1, QType.Q8_0)


@dataclass(frozen=True)
class BlockWeight:
    """A matrix as a GGUF file stores it: rows of quantized blocks, kept beside its float32
    dequantization for the kernels that compute from the blocks (fewer bytes to stream)."""

    qtype: QType
    blocks: torch.Tensor  # uint8 [rows, row bytes]

    @property
    def shape(self) -> tuple[int, int]:  # of the matrix it holds
        block_bytes, values, _ = _BLOCKS[self.qtype]
        return self.blocks.shape[0], self.blocks.shape[1] // block_bytes * values

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.blocks.numpy(), self.qtype)

    def split(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Per block: the float32 scale d [rows, blocks], the float32 offset m (Q4_1; Q8_0:
        None) and the quantized values [rows, blocks, 32] (uint8 0..15, or int8), as
        `dequantize` combines them (w = d * q + m, or q * d)."""
        block_bytes, values, _ = _BLOCKS[self.qtype]
        rows = self.blocks.shape[0]
        b = self.blocks.reshape(-1, block_bytes)
        d = _half(b, 0).view(rows, -1)
        if self.qtype == QType.Q4_1:
            return d, _half(b, 2).view(rows, -1), _nibbles(b[:, 4:]).view(rows, -1, values)
        if self.qtype == QType.Q8_0:
            return d, None, b[:, 2:].contiguous().view(torch.int8).view(rows, -1, values)
        raise ValueError(f"{self.qtype.name} blocks are not split here")

    @staticmethod
    def stack(parts: Sequence[BlockWeight]) -> BlockWeight | None:
        """The parts' rows one after another, or None unless they share one block type."""
        if not parts or any(p.qtype != parts[0].qtype for p in parts):
            return None
        if any(p.blocks.shape[1] != parts[0].blocks.shape[1] for p in parts):
            return None
        return BlockWeight(parts[0].qtype, torch.cat([p.blocks for p in parts]))

    def rows(self, order: torch.Tensor) -> BlockWeight:
        return BlockWeight(self.qtype, self.blocks.index_select(0, order))
