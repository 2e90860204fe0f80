"""The engine: model + paged KV cache + samplers behind one `execute(ForwardBatch)` call.

It knows nothing of inferlets or owners: callers (the control layer, benchmarks, tests) name the
pages each sequence reads and appends to. Every check runs before any state changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from pie.engine import cpu_kernels, cpu_kernels_f32, sampling
from pie.engine.attention import ATTENTION_BACKENDS, sequence_cache_rows
from pie.engine.config import ModelConfig
from pie.engine.errors import InvalidBatchError
from pie.engine.gguf_tensors import BlockWeight
from pie.engine.loader import load_model
from pie.engine.model import AttentionBackend, LlamaModel, release_free_heap
from pie.engine.request import ForwardBatch, ForwardResult, SampleResult, SequenceForward
from pie.engine.tokenizer import Tokenizer


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 matmuls (AVX512-BF16 or AMX)."""
    cpu = getattr(torch._C, "_cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        if cpu is not None and hasattr(cpu, probe) and getattr(cpu, probe)():
            return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # what --dtype may name


def dtype_named(name: str) -> torch.dtype | None:
    """The dtype a `--dtype` choice names; None for "auto" (`default_dtype` decides)."""
    return None if name == "auto" else DTYPES[name]


def default_dtype(
    device: torch.device, blocks: Mapping[str, BlockWeight] | None = None
) -> torch.dtype:
    """bfloat16 on GPUs. On CPUs float32 where its kernels stream a GGUF's own Q4_1/Q8_0 blocks,
    else bfloat16 where the CPU computes it natively (AVX512-BF16, AMX), else float32.

    The blocks win over native bf16: they hold the same float32 weights in 3.6-5.3x fewer bytes
    than bf16 copies, so the results are the dequantized model's exactly and a step reads less.
    Measured with the embedded SmolLM2 on a 16-core AMX Xeon (bench/RESULTS.md): float32 3.55 /
    10.3 / 28.4 ms a step at batch 1 / 8 / 32, bfloat16 9.98 / 13.2 / 31.5."""
    if device.type == "cuda":
        return torch.bfloat16
    if blocks and cpu_kernels_f32.streams_blocks():
        return torch.float32
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


class Engine:
    def __init__(
        self,
        model: LlamaModel,
        tokenizer: Tokenizer,
        *,
        num_pages: int,
        page_size: int,
        attention: AttentionBackend | None = None,
    ) -> None:
        if num_pages < 1 or page_size < 1:
            raise ValueError("num_pages and page_size must be positive")
        cfg = model.config
        self.model = model
        self.config = cfg
        self.tokenizer = tokenizer
        self.model_name = cfg.name
        self.page_size = page_size
        self.num_pages = num_pages
        self.vocab_size = cfg.vocab_size
        self.max_position = cfg.max_position
        self.device = model.device
        self.dtype = model.dtype
        self.attention: AttentionBackend = attention or ATTENTION_BACKENDS["torch"]()
        # [layers, K/V, pages, page_size, kv_heads, head_dim]
        shape = (cfg.num_layers, 2, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
        if model.device.type == "cpu":  # 2 MiB pages: batch-32 decode attention ~10% faster
            self.kv_cache = cpu_kernels.huge_page_zeros(shape, model.dtype)
        else:
            self.kv_cache = torch.zeros(shape, dtype=model.dtype, device=model.device)

    @classmethod
    def load(
        cls,
        model: str | os.PathLike[str] | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        num_pages: int | None = 1024,
        page_size: int = 16,
        attention: str | None = None,
    ) -> Engine:
        """Load a GGUF file or HF folder (None: the embedded SmolLM2) onto `device`.

        `num_pages=None` sizes the KV pool to memory (`pages_for_memory`)."""
        dev = torch.device(device)
        loaded = load_model(model)
        if loaded.gguf_file is not None:
            tokenizer = Tokenizer.from_gguf(loaded.gguf_file)
        else:
            tokenizer = Tokenizer.from_hf_folder(loaded.source)
        backend_name = attention or ("triton" if dev.type == "cuda" else "torch")
        backend = _make_backend(backend_name)
        model_class = LlamaModel
        if backend_name == "triton":  # the CUDA backend: fused norm/RoPE/SwiGLU kernels too
            from pie.engine.cuda.fused_model import FusedLlamaModel

            model_class = FusedLlamaModel
        net = model_class(
            loaded.config,
            loaded.weights,
            dev,
            dtype or default_dtype(dev, loaded.blocks),
            blocks=loaded.blocks,
        )
        loaded_config = loaded.config
        del loaded  # the host's float32 copies of the weights are garbage now: hand them back
        release_free_heap()
        if num_pages is None:
            num_pages = pages_for_memory(loaded_config, net.dtype, page_size, dev)
        engine = cls(net, tokenizer, num_pages=num_pages, page_size=page_size, attention=backend)
        if backend_name == "triton" and dev.type == "cuda":  # decode steps replay CUDA graphs
            from pie.engine.cuda import cuda_graphs

            cuda_graphs.install(engine)
        return engine

    # ---- validation ---------------------------------------------------------------------------
    def validate(self, seq: SequenceForward) -> None:
        """Raise InvalidBatchError if `seq` cannot run; never changes state."""
        n = len(seq.tokens)
        if n == 0:
            raise InvalidBatchError("a sequence needs at least one new token")
        if len(seq.positions) != n:
            raise InvalidBatchError(f"{n} tokens but {len(seq.positions)} positions")
        if seq.context_len < 0:
            raise InvalidBatchError(f"context_len {seq.context_len} is negative")
        # Python's min/max, not numpy's: a batch of 256 decodes validates 256 one-token lists
        # per step, and numpy's per-call cost made that the slowest part of a GPU step.
        if min(seq.tokens) < 0 or max(seq.tokens) >= self.vocab_size:
            bad = next(int(t) for t in seq.tokens if not 0 <= t < self.vocab_size)
            raise InvalidBatchError(
                f"token id {bad} is outside the vocabulary [0, {self.vocab_size})"
            )
        low, high = min(seq.positions), max(seq.positions)
        if low < 0 or high >= self.max_position:
            raise InvalidBatchError(
                f"position {int(high if high >= self.max_position else low)}"
                f" is outside the model's context [0, {self.max_position})"
            )
        length = seq.context_len + n
        needed = -(-length // self.page_size)
        if len(seq.page_ids) < needed:
            raise InvalidBatchError(
                f"{length} slots need {needed} pages of {self.page_size}, got {len(seq.page_ids)}"
            )
        pages = seq.page_ids[:needed]
        if min(pages) < 0 or max(pages) >= self.num_pages:
            raise InvalidBatchError(f"page id outside the pool [0, {self.num_pages})")
        if len(set(pages)) != needed:
            raise InvalidBatchError("a page appears twice in one sequence's page list")
        if seq.attention_mask is not None:
            mask = np.asarray(seq.attention_mask)
            if mask.dtype != np.bool_ or mask.shape != (n, length):
                raise InvalidBatchError(
                    f"attention_mask must be bool [{n}, {length}], got {mask.dtype} {list(mask.shape)}"
                )
            if not mask.any(axis=1).all():
                raise InvalidBatchError("every new token must attend to at least one slot")
        if seq.logit_mask is not None:
            lm = np.asarray(seq.logit_mask)
            if lm.dtype != np.bool_ or lm.shape != (self.vocab_size,) or not lm.any():
                raise InvalidBatchError(
                    f"logit_mask must be bool [{self.vocab_size}] with at least one True"
                )
        for index, spec in seq.outputs:
            if not 0 <= index < n:
                raise InvalidBatchError(f"output index {index} outside the {n} new tokens")
            sampling.validate_spec(spec, self.vocab_size)

    def _validate_batch(self, batch: ForwardBatch) -> None:
        if not batch.sequences:
            raise InvalidBatchError("empty batch")
        ps = self.page_size
        decode_rows: list[int] = []  # the slot a one-token sequence writes, computed directly
        longer: list[np.ndarray] = []
        for s in batch.sequences:
            self.validate(s)
            if len(s.tokens) == 1:
                decode_rows.append(int(s.page_ids[s.context_len // ps]) * ps + s.context_len % ps)
            else:
                rows = sequence_cache_rows(s.page_ids, s.context_len + len(s.tokens), ps)
                longer.append(rows[s.context_len :])
        rows = np.concatenate([np.asarray(decode_rows, dtype=np.int64), *longer])
        if len(np.unique(rows)) != len(rows):
            raise InvalidBatchError("two new tokens in the batch would write the same KV slot")

    # ---- execution ----------------------------------------------------------------------------
    @torch.inference_mode()
    def forward_logits(self, batch: ForwardBatch) -> torch.Tensor:
        """Run the batch, append its K/V, return float32 logits [outputs, vocab] in output order."""
        self._validate_batch(batch)
        tokens: list[int] = []
        positions: list[int] = []
        output_rows: list[int] = []
        for seq in batch.sequences:
            output_rows += [len(tokens) + index for index, _ in seq.outputs]
            tokens += seq.tokens
            positions += seq.positions
        dev = self.device
        meta = self.attention.prepare(batch, self.page_size, dev)
        return self.model.forward(
            torch.tensor(tokens, dtype=torch.long, device=dev),
            torch.tensor(positions, dtype=torch.long, device=dev),
            torch.tensor(output_rows, dtype=torch.long, device=dev),
            self.kv_cache,
            self.attention,
            meta,
        )

    @torch.inference_mode()
    def execute(self, batch: ForwardBatch) -> ForwardResult:
        """One forward pass and every requested sampler; results per sequence, in output order."""
        logits = self.forward_logits(batch)
        specs = [spec for seq in batch.sequences for _, spec in seq.outputs]
        masks = [seq.logit_mask for seq in batch.sequences for _ in seq.outputs]
        at_positions = [seq.positions[i] for seq in batch.sequences for i, _ in seq.outputs]
        any_mask = any(m is not None for m in masks)
        flat: list[SampleResult] = (
            sampling.sample(logits, specs, masks if any_mask else None, at_positions)
            if specs
            else []
        )
        outputs, at = [], 0
        for seq in batch.sequences:
            outputs.append(flat[at : at + len(seq.outputs)])
            at += len(seq.outputs)
        return ForwardResult(outputs)

    @torch.inference_mode()
    def copy_pages(self, pairs: list[tuple[int, int, int]]) -> None:
        """Copy the first n slots of page src into page dst, for each (src, dst, n)."""
        for src, dst, n in pairs:
            if not (0 <= src < self.num_pages and 0 <= dst < self.num_pages):
                raise InvalidBatchError(f"page copy {src}->{dst} outside the pool")
            if not 0 <= n <= self.page_size:
                raise InvalidBatchError(f"page copy of {n} slots; a page holds {self.page_size}")
        for src, dst, n in pairs:
            self.kv_cache[:, :, dst, :n] = self.kv_cache[:, :, src, :n]

    def save_pages(self, pages: list[int]) -> torch.Tensor:
        """A host-memory copy of `pages`' KV (a preempted context's, swapped out)."""
        self._check_pages(pages)
        index = torch.tensor(pages, dtype=torch.long, device=self.kv_cache.device)
        return self.kv_cache.index_select(2, index).to("cpu", copy=True)

    def load_pages(self, pages: list[int], data: torch.Tensor) -> None:
        """Writes a `save_pages` copy into `pages` (a swapped context coming back)."""
        self._check_pages(pages)
        if data.shape[2] != len(pages):
            raise InvalidBatchError(f"{data.shape[2]} saved pages for {len(pages)} page ids")
        index = torch.tensor(pages, dtype=torch.long, device=self.kv_cache.device)
        self.kv_cache.index_copy_(2, index, data.to(self.kv_cache.device))

    # ---- snapshot files (pie/control/snapshot_disk.py) -----------------------------------------
    def kv_fingerprint(self) -> dict[str, object]:
        """What saved KV is only valid for: the model (its config and a digest of its
        embedding rows, so a fine-tune with the same shapes differs), dtype and page size."""
        config = json.dumps(dataclasses.asdict(self.config), sort_keys=True, default=str)
        rows = self.model.embed[:64].detach().to("cpu", torch.float32).contiguous()
        digest = hashlib.sha256(config.encode() + rows.numpy().tobytes()).hexdigest()
        cfg = self.config
        return {
            "model": str(self.model_name),
            "config": digest,
            "dtype": str(self.dtype).removeprefix("torch."),
            "page_size": int(self.page_size),
            "kv_shape": [cfg.num_layers, 2, cfg.num_kv_heads, cfg.head_dim],
        }

    def write_saved_pages(self, data: torch.Tensor, path: Path) -> None:
        """Writes a `save_pages` copy to `path` (flushed to the disk before it returns)."""
        with path.open("wb") as f:
            torch.save(data.contiguous(), f)
            f.flush()
            os.fsync(f.fileno())

    def read_saved_pages(self, path: Path) -> torch.Tensor:
        """A `write_saved_pages` file, checked against this engine's KV layout."""
        data = torch.load(path, map_location="cpu", weights_only=True)
        expected = (*self.kv_cache.shape[:2], *self.kv_cache.shape[3:])
        if (
            not isinstance(data, torch.Tensor)
            or data.dtype != self.kv_cache.dtype
            or (*data.shape[:2], *data.shape[3:]) != expected
        ):
            raise InvalidBatchError(f"{path} does not hold KV pages of this model and dtype")
        return data

    def _check_pages(self, pages: list[int]) -> None:
        bad = [p for p in pages if not 0 <= p < self.num_pages]
        if bad:
            raise InvalidBatchError(f"pages {bad[:4]} outside the pool of {self.num_pages}")


def _make_backend(name: str) -> AttentionBackend:
    if name == "triton":
        from pie.engine.cuda import TritonAttention  # imported lazily: needs triton

        return TritonAttention()
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}: choose from torch, triton")
    backend: AttentionBackend = ATTENTION_BACKENDS[name]()
    return backend


# The KV space vLLM's CPU backend reserves by default (VLLM_CPU_KVCACHE_SPACE).
CPU_KV_BYTES = 4 * 2**30


def pages_for_memory(
    cfg: ModelConfig, dtype: torch.dtype, page_size: int, device: torch.device
) -> int:
    """A KV pool sized to the machine: on CPU 4 GiB or a quarter of the memory available,
    whichever is less; on CUDA half of what is free once the weights are loaded. Never more pages
    than hold 64 contexts of the model's full length, never fewer than 64."""
    per_page = cfg.num_layers * 2 * page_size * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free // 2
    else:
        budget = min(CPU_KV_BYTES, available_memory() // 4)
    most = 64 * -(-cfg.max_position // page_size)
    return max(64, min(most, budget // per_page))


def available_memory() -> int:
    """Bytes of memory the OS could hand out now (Linux MemAvailable; else the physical total)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
