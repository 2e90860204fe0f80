"""TritonAttention: the CUDA attention backend (pie.engine.model.AttentionBackend) over Triton.

`prepare` uploads one step's tables (pie.engine.cuda.metadata); `forward` writes the new K/V
into the pages and attends, with the decode kernel for one-token sequences and the prefill
kernel for the rest, so a mixed batch costs two launches per layer and pads nothing.
"""

from __future__ import annotations

import torch

from pie.engine.cuda.metadata import KernelConfig, TritonMetadata, build_metadata, decode_splits
from pie.engine.cuda.paged_attention import decode_attention, prefill_attention, store_kv
from pie.engine.errors import InvalidBatchError
from pie.engine.request import ForwardBatch


class TritonAttention:
    """Paged attention for ragged batches in Triton; same semantics as TorchAttention."""

    name = "triton"

    def __init__(self, config: KernelConfig | None = None) -> None:
        self.config = config or KernelConfig()

    def prepare(self, batch: ForwardBatch, page_size: int, device: torch.device) -> TritonMetadata:
        return build_metadata(batch, page_size, device, self.config)

    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, KH, D]
        v: torch.Tensor,  # [T, KH, D]
        k_cache: torch.Tensor,  # [P, page_size, KH, D]
        v_cache: torch.Tensor,
        meta: TritonMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, H, D]
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise InvalidBatchError(
                "TritonAttention needs each layer's K and V cache contiguous [P, page, KH, D]; "
                "slice the engine's cache per layer and K/V, not per page"
            )
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        store_kv(k, v, k_cache, v_cache, meta.slot_rows)
        out = q.new_empty(q.shape)
        cfg = self.config
        if meta.num_decode:
            if meta.num_splits is None:  # first layer of the step: KV heads are known now
                meta.num_splits = decode_splits(
                    meta.num_decode, k_cache.shape[2], meta.max_decode_kv, cfg
                )
            decode_attention(q, k_cache, v_cache, out, meta, scale, cfg.block_n, cfg.decode_warps)
        if meta.num_prefill_blocks:
            prefill_attention(
                q, k_cache, v_cache, out, meta, scale, cfg.block_m, cfg.block_n, cfg.prefill_warps
            )
        return out
