"""CUDA graphs for decode steps: the model forward captured once per batch size, then replayed.

A decode step of a small model is bound by kernel launches (~300 per forward), not by the GPU;
a graph replays them all in one call. Graphs fix shapes and addresses, so every input lives in a
static buffer sized for the largest batch, and a step of n sequences runs the graph of the
smallest captured size >= n, padded:

    rows 0 .. n-1       the live decodes (token, position, slot, kv_len, page row)
    rows n .. bucket-1  padding: slot -1 (the KV store skips it), kv_len 0 (attention reads
                        nothing and writes zeros), token 0 at position 0; logits ignored

Only plain decode steps qualify (one new token per sequence, no custom mask); everything else
runs eagerly. Without CUDA (or without the Triton backend) `for_engine` returns None: a no-op.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pie.engine.cuda.metadata import KernelConfig, TritonMetadata, decode_splits
from pie.engine.request import ForwardBatch

if TYPE_CHECKING:
    from pie.engine.engine import Engine
    from pie.engine.model import AttentionBackend, LlamaModel

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def bucket_for(n: int, sizes: Sequence[int]) -> int | None:
    """The smallest captured batch size that holds n sequences, or None if none does."""
    fits = [s for s in sizes if s >= n]
    return min(fits) if fits and n > 0 else None


def is_plain_decode(batch: ForwardBatch) -> bool:
    return all(len(s.tokens) == 1 and s.attention_mask is None for s in batch.sequences)


class DecodeGraphs:
    """Static decode inputs, their captured graphs, and the padding between the two."""

    def __init__(
        self,
        model: LlamaModel,
        kv_cache: torch.Tensor,  # [layers, 2, P, page_size, KH, D]
        attention: AttentionBackend,
        page_size: int,
        *,
        batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
        max_context: int | None = None,
        kernel_config: KernelConfig | None = None,
        capture: bool = True,
    ) -> None:
        """`capture=False` runs the same padded static-buffer path eagerly (CPU tests)."""
        if capture and kv_cache.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device; pass capture=False to run eagerly")
        self.model = model
        self.kv_cache = kv_cache
        self.attention = attention
        self.page_size = page_size
        self.sizes = tuple(sorted(set(batch_sizes)))
        num_pages, kv_heads = kv_cache.shape[2], kv_cache.shape[4]
        context = min(max_context or model.config.max_position, num_pages * page_size)
        self.width = -(-context // page_size)  # block-table columns: pages of the longest context
        cfg = kernel_config or getattr(attention, "config", None) or KernelConfig()
        dev = kv_cache.device
        biggest = self.sizes[-1]
        # Static device inputs; buckets use prefixes of them.
        self.ids = torch.zeros((2, biggest), dtype=torch.int64, device=dev)  # tokens, positions
        self.small = torch.zeros((2, biggest), dtype=torch.int32, device=dev)  # slots, kv_lens
        self.small[0].fill_(-1)  # no live token until the first step fills one
        self.table = torch.zeros((biggest, self.width), dtype=torch.int32, device=dev)
        self.rows = torch.arange(biggest, dtype=torch.int64, device=dev)  # logits of every row
        seq_ids = torch.arange(biggest + 1, dtype=torch.int32, device=dev)  # q_start and decode ids
        self.metas = {
            b: TritonMetadata(
                num_tokens=b,
                slot_rows=self.small[0, :b],
                q_start=seq_ids[: b + 1],
                kv_lens=self.small[1, :b],
                block_table=self.table[:b],
                mask_off=None,
                mask=None,
                decode_seqs=seq_ids[:b],
                prefill_blocks=None,
                max_decode_kv=context,
                # fixed per graph: a context-independent grid, each split sized in the kernel
                num_splits=decode_splits(b, kv_heads, context, cfg),
            )
            for b in self.sizes
        }
        # Host staging: pinned so uploads are asynchronous; `_uploaded` guards its reuse.
        pin = dev.type == "cuda"
        self.host_ids = torch.zeros((2, biggest), dtype=torch.int64, pin_memory=pin)
        self.host_small = torch.zeros((2, biggest), dtype=torch.int32, pin_memory=pin)
        self.host_table = torch.zeros(biggest * self.width, dtype=torch.int32, pin_memory=pin)
        self._uploaded: Any = None  # torch.cuda.Event after the last upload, or None
        self.graphs: dict[int, tuple[Any, torch.Tensor]] = {}  # bucket -> (CUDAGraph, logits)
        if capture:
            self._capture()

    @classmethod
    def for_engine(cls, engine: Engine, **kwargs: Any) -> DecodeGraphs | None:
        """Graphs for `engine`'s decode steps, or None where they do not apply (CPU, torch)."""
        if engine.device.type != "cuda" or getattr(engine.attention, "name", "") != "triton":
            return None
        return cls(engine.model, engine.kv_cache, engine.attention, engine.page_size, **kwargs)

    # ---- per step -------------------------------------------------------------------------------
    def eligible(self, batch: ForwardBatch) -> bool:
        seqs = batch.sequences
        if not seqs or len(seqs) > self.sizes[-1] or not is_plain_decode(batch):
            return False
        longest = max(s.context_len for s in seqs) + 1
        return -(-longest // self.page_size) <= self.width

    @torch.inference_mode()
    def forward_logits(self, batch: ForwardBatch) -> torch.Tensor | None:
        """Float32 logits [outputs, V] in output order, or None if the batch must run eagerly.

        The result may be a view of the graph's static output: read it before the next step.
        """
        if not self.eligible(batch):
            return None
        seqs = batch.sequences
        bucket = bucket_for(len(seqs), self.sizes)
        assert bucket is not None  # eligible() bounded the batch size
        self._fill(batch, bucket)
        if self.graphs:
            graph, logits = self.graphs[bucket]
            graph.replay()
        else:
            logits = self._forward(bucket)
        counts = [len(s.outputs) for s in seqs]
        if all(c == 1 for c in counts):
            return logits[: len(seqs)]
        rows = np.repeat(np.arange(len(seqs)), counts)
        return logits.index_select(0, torch.from_numpy(rows).to(logits.device))

    def _fill(self, batch: ForwardBatch, bucket: int) -> None:
        """Write the padded inputs of one step into the static buffers."""
        seqs = batch.sequences
        n, ps = len(seqs), self.page_size
        if self._uploaded is not None:  # the previous step's upload still reads the staging
            self._uploaded.synchronize()
        ctx = np.fromiter((s.context_len for s in seqs), dtype=np.int64, count=n)
        pages = ctx // ps + 1
        live = int(pages.max())
        table = self.host_table[: n * live].numpy().reshape(n, live)
        for b, s in enumerate(seqs):
            table[b, : pages[b]] = s.page_ids[: pages[b]]
        ids = self.host_ids.numpy()
        small = self.host_small.numpy()
        ids[0, :n] = [s.tokens[0] for s in seqs]
        ids[1, :n] = [s.positions[0] for s in seqs]
        ids[:, n:bucket] = 0
        small[0, :n] = table[np.arange(n), ctx // ps].astype(np.int64) * ps + ctx % ps
        small[1, :n] = ctx + 1
        small[0, n:bucket] = -1  # padding writes no KV ...
        small[1, n:bucket] = 0  # ... and reads none
        # Rows past `live` columns keep stale page ids; kv_len bounds every read before them.
        self.ids[:, :bucket].copy_(self.host_ids[:, :bucket], non_blocking=True)
        self.small[:, :bucket].copy_(self.host_small[:, :bucket], non_blocking=True)
        dst = self.table[:n, :live]
        dst.copy_(self.host_table[: n * live].view(n, live), non_blocking=True)
        if self.ids.device.type == "cuda":
            self._uploaded = torch.cuda.Event()
            self._uploaded.record()

    def _forward(self, bucket: int) -> torch.Tensor:  # [bucket, V] float32
        return self.model.forward(
            self.ids[0, :bucket],
            self.ids[1, :bucket],
            self.rows[:bucket],
            self.kv_cache,
            self.attention,
            self.metas[bucket],
        )

    # ---- capture --------------------------------------------------------------------------------
    def _capture(self) -> None:
        """Capture every bucket, largest first, into one memory pool (as vLLM does): graphs
        replay one at a time on one stream, so their intermediates may share memory."""
        torch.cuda.synchronize()
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for bucket in reversed(self.sizes):
                # Warm up outside the capture: Triton compiles, cuBLAS picks its kernels, and
                # the split-K scratch of this bucket's metadata is allocated.
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self._forward(bucket)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._forward(bucket)
                self.graphs[bucket] = (graph, logits)
        torch.cuda.synchronize()


def install(engine: Engine, **kwargs: Any) -> DecodeGraphs | None:
    """Route `engine`'s plain decode steps through captured graphs; off CUDA, change nothing.

    With the engine's own hook (an `engine.decode_graphs` attribute that `forward_logits`
    consults after validating) the graphs are simply handed to it. Without it, `forward_logits`
    is wrapped: validate, replay a graph when the batch fits one, else run eagerly.
    """
    graphs = DecodeGraphs.for_engine(engine, **kwargs)
    if graphs is None:
        return None
    if hasattr(engine, "decode_graphs"):
        engine.decode_graphs = graphs
        return graphs
    eager = engine.forward_logits

    def forward_logits(batch: ForwardBatch) -> torch.Tensor:
        engine._validate_batch(batch)
        logits = graphs.forward_logits(batch)
        return eager(batch) if logits is None else logits

    setattr(engine, "forward_logits", forward_logits)  # noqa: B010 (mypy: a method slot)
    return graphs
