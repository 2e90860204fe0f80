"""Per-step attention metadata of the Triton backend: a ForwardBatch as a few int32 device tensors.

Built once per step on the host (numpy, vectorised over tokens) and uploaded in one transfer;
every layer's kernels then read the same tensors, so there is no per-layer host work. Imports
no Triton, so the CUDA-graph bucket logic and these tables are testable anywhere.

    sequences b = 0..B-1, new tokens of b at rows q_start[b] .. q_start[b+1]-1 of the flat batch
    kv_lens[b]   = context_len + new tokens: slots 0..kv_lens[b]-1 are read
    block_table[b, j] = page holding slots j*page_size .. (j+1)*page_size-1 (0 past the end)
    mask_off[b]  = byte offset of b's [new, kv_len] custom mask in `mask`, or -1 (causal)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pie.engine.request import ForwardBatch


@dataclass(frozen=True, slots=True)
class KernelConfig:
    """Launch shapes; the defaults suit an H100, tests pass small ones for the interpreter."""

    block_m: int = 64  # prefill: query rows per program
    block_n: int = 64  # slots per inner step (prefill and decode)
    # Warps per program. Compiled for sm_90 (pie.engine.cuda.compile_check), prefill at 64x64
    # with D=128 needs 8 warps to stay in registers (4 spill 656 bytes with a mask); decode
    # fits 4 (96-120 registers).
    prefill_warps: int = 8
    decode_warps: int = 4
    # Decode split-K: enough programs to fill the GPU (~2 per SM), each reading at least
    # `split_min_slots` slots so the reduce pass stays a small fraction of the work.
    target_programs: int = 264
    split_min_slots: int = 256
    max_splits: int = 16


@dataclass(slots=True)
class TritonMetadata:
    num_tokens: int
    slot_rows: torch.Tensor  # [T] int32: flat cache row each new token's K/V goes to (-1: skip)
    q_start: torch.Tensor  # [B + 1] int32: cu_seqlens of the new tokens
    kv_lens: torch.Tensor  # [B] int32
    block_table: torch.Tensor  # [B, W] int32
    mask_off: torch.Tensor | None  # [B] int32, -1 = causal; None = no custom mask in the batch
    mask: torch.Tensor | None  # [M] uint8: every custom mask, row-major [new, kv_len], packed
    decode_seqs: torch.Tensor | None  # [Bd] int32: sequences with exactly one new token
    prefill_blocks: torch.Tensor | None  # [NB, 2] int32: (sequence, first query index) per block
    max_decode_kv: int  # longest context among the decodes (host int: sizes split-K)
    # Decode split-K factor; None = chosen by the first layer (it knows the KV heads). CUDA
    # graphs fix it per batch size, since the grid is part of the captured launch.
    num_splits: int | None = None
    # Scratch for split-K partial results, made by the first layer and reused by the others.
    partial_out: torch.Tensor | None = None  # [Bd, H, S, D] float32
    partial_lse: torch.Tensor | None = None  # [Bd, H, S] float32 (log2 domain)

    @property
    def num_decode(self) -> int:
        return 0 if self.decode_seqs is None else self.decode_seqs.shape[0]

    @property
    def num_prefill_blocks(self) -> int:
        return 0 if self.prefill_blocks is None else self.prefill_blocks.shape[0]


def decode_splits(num_seqs: int, kv_heads: int, max_kv_len: int, cfg: KernelConfig) -> int:
    """How many slices of the context each decode (sequence, KV head) is cut into."""
    programs = max(num_seqs * kv_heads, 1)
    if programs >= cfg.target_programs:
        return 1
    by_occupancy = -(-cfg.target_programs // programs)
    by_length = max(max_kv_len // cfg.split_min_slots, 1)
    return max(1, min(cfg.max_splits, by_occupancy, by_length))


def build_metadata(
    batch: ForwardBatch, page_size: int, device: torch.device, cfg: KernelConfig
) -> TritonMetadata:
    seqs = batch.sequences
    q_lens = np.fromiter((len(s.tokens) for s in seqs), dtype=np.int64, count=len(seqs))
    ctx = np.fromiter((s.context_len for s in seqs), dtype=np.int64, count=len(seqs))
    kv_lens = ctx + q_lens
    q_start = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(q_lens, out=q_start[1:])
    pages = -(-kv_lens // page_size)
    table = np.zeros((len(seqs), max(int(pages.max()), 1)), dtype=np.int32)
    for b, s in enumerate(seqs):
        table[b, : pages[b]] = s.page_ids[: pages[b]]
    # slot of each new token: context_len + its index within the sequence
    token_seq = np.repeat(np.arange(len(seqs)), q_lens)
    token_slot = np.arange(int(q_start[-1])) - q_start[token_seq] + ctx[token_seq]
    slot_rows = table[token_seq, token_slot // page_size].astype(np.int64) * page_size
    slot_rows += token_slot % page_size

    mask_off = None
    mask_bytes: list[np.ndarray] = []
    if any(s.attention_mask is not None for s in seqs):
        mask_off = np.full(len(seqs), -1, dtype=np.int64)
        at = 0
        for b, s in enumerate(seqs):
            if s.attention_mask is not None:
                mask_off[b] = at
                flat = np.ascontiguousarray(s.attention_mask, dtype=np.bool_).view(np.uint8).ravel()
                mask_bytes.append(flat)
                at += flat.size
    decode = np.flatnonzero(q_lens == 1)
    other = np.flatnonzero(q_lens != 1)
    blocks = [(b, m) for b in other for m in range(0, int(q_lens[b]), cfg.block_m)]

    # One int32 upload: every table back to back, then the mask bytes (padded to 4).
    parts: list[np.ndarray] = [slot_rows, q_start, kv_lens, table.ravel()]
    if mask_off is not None:
        parts.append(mask_off)
    if len(decode):
        parts.append(decode)
    if blocks:
        parts.append(np.asarray(blocks, dtype=np.int64).ravel())
    sizes = [p.size for p in parts]
    if mask_bytes:
        raw = np.concatenate(mask_bytes)
        raw = np.concatenate([raw, np.zeros(-raw.size % 4, dtype=np.uint8)])
        parts.append(raw.view(np.int32))
    host = torch.from_numpy(np.concatenate([p.astype(np.int32, copy=False) for p in parts]))
    if device.type == "cuda":
        host = host.pin_memory()
    buf = host.to(device, non_blocking=True)
    views = list(buf[: sum(sizes)].split(sizes))
    slot_t, q_start_t, kv_lens_t, table_t = views[:4]
    rest = views[4:]
    mask_off_t = rest.pop(0) if mask_off is not None else None
    decode_t = rest.pop(0) if len(decode) else None
    blocks_t = rest.pop(0).view(-1, 2) if blocks else None
    mask_t = buf[sum(sizes) :].view(torch.uint8) if mask_bytes else None
    return TritonMetadata(
        num_tokens=int(q_start[-1]),
        slot_rows=slot_t,
        q_start=q_start_t,
        kv_lens=kv_lens_t,
        block_table=table_t.view(len(seqs), -1),
        mask_off=mask_off_t,
        mask=mask_t,
        decode_seqs=decode_t,
        prefill_blocks=blocks_t,
        max_decode_kv=int(kv_lens[decode].max()) if len(decode) else 0,
    )
