"""The Llama-family transformer (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3) over ragged batches.

All new tokens of a batch are one flat [T, hidden] tensor; attention is delegated to a backend
(pie.engine.attention) that reads and appends the paged KV cache. Weights come from the loader
under canonical names; q/k/v and gate/up are fused here so each layer runs four matmuls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from pie.engine import cpu_kernels, cpu_kernels_f32
from pie.engine.config import ModelConfig
from pie.engine.gguf_tensors import BlockWeight
from pie.engine.linear import Linear, rms_norm


class AttentionBackend(Protocol):
    name: str

    def prepare(self, batch: Any, page_size: int, device: torch.device) -> Any: ...

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: Any,
        scale: float,
    ) -> torch.Tensor:
        """Append k/v [T, KH, D] to the caches, attend q [T, H, D]; return [T, H, D].

        q, k and v are strided views into the layer's projections (last dim contiguous, rows
        further apart than H * D or KH * D): call `.contiguous()` where a kernel needs it.
        """
        ...


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [hidden]
    qkv: Linear  # [(H + 2 KH) * D, hidden], with bias for Qwen2
    q_norm: torch.Tensor | None  # [D] (Qwen3)
    k_norm: torch.Tensor | None
    o: Linear  # [hidden, H * D]
    mlp_norm: torch.Tensor
    gate_up: Linear  # [2 * mlp, hidden]
    down: Linear  # [hidden, mlp]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's rotate-half RoPE in the model dtype: x * cos + rotate_half(x) * sin.

    x: [T, heads, D]; cos: [T, 1, D]; sin: [T, 1, D] with its first half negated, so that
    rotate_half(x) * sin == roll(x, D/2) * sin_signed exactly (GGUF rows were un-permuted on
    load). Same ops and roundings as HF's apply_rotary_pos_emb.
    """
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling
    if scaling is not None:  # Llama 3: stretch low frequencies, keep high ones, blend between
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        inv_freq = torch.where(mid, blended, inv_freq)
    return inv_freq.float()


def tune_cpu_allocator() -> bool:
    """Keep freed activation buffers in glibc's heap instead of returning them to the OS.

    Every forward allocates the same few-hundred-KB to tens-of-MB activations; by default
    glibc serves those with fresh mmaps that page-fault on first touch, which halves the speed
    of batch-32 decode attention and makes float32 casts cost 3x. Process-wide and idempotent;
    returns False (and changes nothing) where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    # 32 MiB is glibc's ceiling for the mmap threshold on 64-bit; trim only past 1 GiB free
    # (mallopt takes a C int).
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def release_free_heap() -> bool:
    """Hand the C heap's free memory back to the OS (glibc's malloc_trim); False elsewhere.

    Loading dequantizes every weight to float32 before the kernels pack it, and the freed
    float32 copies stay in the process (tune_cpu_allocator keeps up to 1 GiB of free heap for
    reuse): measured on SmolLM2, resident memory after a load 1193 -> 499 MB, in 0.08 s.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return False
    trim(ctypes.c_size_t(0))
    return True


def _rope_kernel_takes(x: torch.Tensor, dim: int) -> bool:
    """Whether a CPU kernel rotates activations like x (head size dim) here."""
    if x.dtype == torch.float32:
        return dim % 16 == 0 and cpu_kernels_f32.usable(x) is not None
    return dim % 32 == 0 and cpu_kernels.usable(x) is not None


def _rope_kernel(
    x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor | None:
    """RoPE by the CPU kernel for x's dtype, or None where none takes x."""
    f32_lib = cpu_kernels_f32.usable(x)
    if f32_lib is not None:
        return cpu_kernels_f32.rope(f32_lib, x, positions, cos, sin)
    lib = cpu_kernels.usable(x)
    if lib is not None:
        return cpu_kernels.rope(lib, x, positions, cos, sin)
    return None


class LlamaModel:
    """Holds weights and runs one forward over a flat ragged batch of new tokens."""

    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        device: torch.device,
        dtype: torch.dtype,
        blocks: Mapping[str, BlockWeight] | None = None,  # GGUF blocks of some of `weights`
    ) -> None:
        self.config = config
        self.device = device
        self.dtype = dtype
        if device.type == "cpu":
            tune_cpu_allocator()

        def w(name: str) -> torch.Tensor:
            return weights[name].to(device=device, dtype=dtype).contiguous()

        def opt(name: str) -> torch.Tensor | None:
            return w(name) if name in weights else None

        def matrix_blocks(*names: str) -> BlockWeight | None:  # of these rows stacked, if kept
            if blocks is None or any(n not in blocks for n in names):
                return None
            return BlockWeight.stack([blocks[n] for n in names])

        def fused(*names: str) -> torch.Tensor:  # rows stacked, converted in the same pass
            parts = [weights[n] for n in names]
            out = torch.empty(
                (sum(p.shape[0] for p in parts), parts[0].shape[1]), dtype=dtype, device=device
            )
            at = 0
            for p in parts:
                out[at : at + p.shape[0]].copy_(p)
                at += p.shape[0]
            return out

        # The CPU kernels' packed weights, in call order, in 2 MiB pages (see cpu_kernels).
        arena = (
            cpu_kernels.HugePageArena()
            if device.type == "cpu" and dtype in (torch.bfloat16, torch.float32)
            else None
        )
        self.embed = w("embed")  # [V, hidden]
        self.final_norm = w("final_norm")
        self.layers: list[LayerWeights] = []
        for i in range(config.num_layers):
            p = f"layers.{i}."
            bias = None
            if config.attention_bias:
                bias = torch.cat([w(p + "bq"), w(p + "bk"), w(p + "bv")])
            # RoPE folds into the qkv matmul where q and k are rotated straight from it (Qwen3
            # normalizes them first): one pass over them fewer a layer
            qk_norm = p + "q_norm" in weights
            self.layers.append(
                LayerWeights(
                    attn_norm=w(p + "attn_norm"),
                    qkv=Linear(
                        fused(p + "wq", p + "wk", p + "wv"),
                        bias,
                        arena=arena,
                        rope_heads=0 if qk_norm else config.num_heads + config.num_kv_heads,
                        head_dim=config.head_dim,
                        blocks=matrix_blocks(p + "wq", p + "wk", p + "wv"),
                    ),
                    q_norm=opt(p + "q_norm"),
                    k_norm=opt(p + "k_norm"),
                    o=Linear(w(p + "wo"), arena=arena, blocks=matrix_blocks(p + "wo")),
                    mlp_norm=w(p + "mlp_norm"),
                    gate_up=Linear(
                        fused(p + "w_gate", p + "w_up"),
                        gated=True,
                        arena=arena,
                        blocks=matrix_blocks(p + "w_gate", p + "w_up"),
                    ),
                    down=Linear(w(p + "w_down"), arena=arena, blocks=matrix_blocks(p + "w_down")),
                )
            )
        tied = config.tie_word_embeddings or "lm_head" not in weights
        self.lm_head = Linear(
            self.embed if tied else w("lm_head"),
            arena=arena,
            blocks=matrix_blocks("embed" if tied else "lm_head"),
        )
        # Tables in the model dtype, as HF casts cos/sin to the activations' dtype.
        freqs = torch.outer(
            torch.arange(config.max_position, dtype=torch.float32), rope_inv_freq(config)
        )
        cos, sin = freqs.cos(), freqs.sin()  # [max_position, D / 2]
        self.rope_cos = torch.cat([cos, cos], dim=-1).to(device, dtype)  # [max_position, D]
        self.rope_sin = torch.cat([-sin, sin], dim=-1).to(device, dtype)  # sign of rotate_half
        # one C call for every layer of a decode step, per KV cache: see _decode_layers
        self._decode_layer_calls: dict[int, cpu_kernels_f32.DecodeLayers] = {}

    def weight_bytes(self) -> int:
        """Bytes of weights a batch-1 decode step reads (embedding rows aside, lm_head in full;
        GGUF blocks where the float32 kernels stream them)."""
        total = self.lm_head.nbytes + self.final_norm.numel() * self.final_norm.element_size()
        for layer in self.layers:
            for part in vars(layer).values():
                if isinstance(part, Linear):
                    total += part.nbytes
                elif part is not None:
                    total += part.numel() * part.element_size()
        return total

    def _rotate(
        self,
        x: torch.Tensor,  # [T, heads, D]
        positions: torch.Tensor,  # [T]
        rows: tuple[torch.Tensor, torch.Tensor] | None,  # cos, sin [T, 1, D], or None
    ) -> torch.Tensor:
        out = _rope_kernel(x, positions, self.rope_cos, self.rope_sin)
        if out is not None:
            return out
        if rows is None:
            rows = self._rope_rows(positions)
        return apply_rope(x, *rows)

    def _rope_rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.rope_cos.index_select(0, positions)[:, None, :]  # [T, 1, D]
        sin = self.rope_sin.index_select(0, positions)[:, None, :]
        return cos, sin

    def _attention_inputs(
        self,
        layer: LayerWeights,
        x: torch.Tensor,  # [T, hidden]
        positions: torch.Tensor,  # [T]
        rope_rows: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # q [T, H, D], k and v [T, KH, D]
        """A layer's q, k (rotated) and v from its input x."""
        cfg = self.config
        n_tokens, heads, kv_heads, dim = x.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = heads * dim, kv_heads * dim
        eps = cfg.rms_norm_eps
        folded = layer.qkv.folds_rope and not layer.qkv.runs_wide(n_tokens)
        if folded:  # rotated as the matmul writes them
            qkv = layer.qkv.rotated(
                x, positions, self.rope_cos, self.rope_sin, norm=layer.attn_norm, eps=eps
            )
        else:
            qkv = layer.qkv(x, norm=layer.attn_norm, eps=eps)  # [T, (H + 2 KH) * D]
        v = qkv[:, q_size + kv_size :].view(n_tokens, kv_heads, dim)
        q = qkv[:, :q_size].view(n_tokens, heads, dim)
        k = qkv[:, q_size : q_size + kv_size].view(n_tokens, kv_heads, dim)
        if folded:
            return q, k, v
        if layer.q_norm is not None and layer.k_norm is not None:
            q = self._rotate(rms_norm(q, layer.q_norm, eps), positions, rope_rows)
            k = self._rotate(rms_norm(k, layer.k_norm, eps), positions, rope_rows)
            return q, k, v
        # q and k rotate together: one call for H + KH heads
        qk_in = qkv[:, : q_size + kv_size].view(n_tokens, heads + kv_heads, dim)
        qk = self._rotate(qk_in, positions, rope_rows)
        return qk[:, :heads], qk[:, heads:], v

    def _decode_layers(self, kv_cache: torch.Tensor) -> cpu_kernels_f32.DecodeLayers | None:
        """Every layer as one float32 C call, where the kernels run every part of them (CPU
        float32, RoPE folded into qkv, no q/k norm): ~5 ms of a 20 ms batch-1 step was
        Python and ctypes around ~150 kernel calls."""
        cfg = self.config
        lib = cpu_kernels_f32.load()
        if (
            lib is None
            or self.dtype != torch.float32
            or self.device.type != "cpu"
            or not cpu_kernels_f32.decode_attention_supported(
                cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
            )
        ):
            return None
        key = kv_cache.data_ptr()
        if key in self._decode_layer_calls:
            return self._decode_layer_calls[key]
        if not all(layer.qkv.folds_rope and layer.q_norm is None for layer in self.layers):
            return None
        packings = [
            [m.f32 for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]
            for layer in self.layers
        ]
        layers = []
        for layer, packing, (k_cache, v_cache) in zip(
            self.layers, packings, kv_cache.unbind(0), strict=True
        ):
            qkv, o, gate_up, down = packing
            if qkv is None or o is None or gate_up is None or down is None:
                return None
            kv_shape = (-1, cfg.num_kv_heads, cfg.head_dim)
            norms = (layer.attn_norm, layer.mlp_norm)
            layers.append(
                (qkv, o, gate_up, down, *norms, k_cache.view(kv_shape), v_cache.view(kv_shape))
            )
        call = cpu_kernels_f32.DecodeLayers(
            lib, layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
        )
        self._decode_layer_calls = {key: call}  # the engine keeps one KV cache
        return call

    def forward(
        self,
        tokens: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        output_rows: torch.Tensor,  # [O] rows of T whose logits are wanted
        kv_cache: torch.Tensor,  # [layers, 2, P, page_size, KH, D]
        attention: AttentionBackend,
        meta: Any,
    ) -> torch.Tensor:  # [O, V] float32 logits
        cfg = self.config
        n_tokens, dim = tokens.shape[0], cfg.head_dim
        q_size = cfg.num_heads * dim
        scale = dim**-0.5
        eps = cfg.rms_norm_eps
        x = F.embedding(tokens, self.embed)  # [T, hidden]
        rope_rows = None if _rope_kernel_takes(x, dim) else self._rope_rows(positions)
        decode = getattr(attention, "decode_rows", lambda _meta: None)(meta)
        layers = None if decode is None else self._decode_layers(kv_cache)
        if layers is not None and decode is not None:  # every layer in one C call
            kv_rows, kv_lens, mask, slot_rows = decode
            layers(
                x, positions, self.rope_cos, self.rope_sin, kv_rows, kv_lens, mask, slot_rows, scale
            )
            return self._logits(x, output_rows)
        k_caches = kv_cache[:, 0].unbind(0)  # per layer [P, page_size, KH, D]
        v_caches = kv_cache[:, 1].unbind(0)
        for layer, k_cache, v_cache in zip(self.layers, k_caches, v_caches, strict=True):
            q, k, v = self._attention_inputs(layer, x, positions, rope_rows)
            o = attention.forward(q, k, v, k_cache, v_cache, meta, scale)  # [T, H, D]
            x = layer.o(o.reshape(n_tokens, q_size), residual=x)
            x = layer.down(layer.gate_up.swiglu(x, norm=layer.mlp_norm, eps=eps), residual=x)
        return self._logits(x, output_rows)

    def _logits(self, x: torch.Tensor, output_rows: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if output_rows.numel() == 0:  # a prefill that only fills the cache needs no LM head
            return torch.empty((0, cfg.vocab_size), dtype=torch.float32, device=x.device)
        x = x.index_select(0, output_rows)
        return self.lm_head(x, norm=self.final_norm, eps=cfg.rms_norm_eps).float()
