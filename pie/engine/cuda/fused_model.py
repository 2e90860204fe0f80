"""`FusedLlamaModel`: the Llama-family forward of pie.engine.model with fused Triton kernels.

Same weights, same maths and the same roundings as `LlamaModel` (so as HF); only the
elementwise work between the matmuls is fused. One layer, with T new tokens:

    torch path (LlamaModel)                    fused path (this module)
    add residual; RMSNorm (~8 launches)        add_rms_norm           1 launch
    qkv matmul                                 qkv matmul
    RoPE: 2 gathers, roll, 3 ops (+q/k norm)   rope (+ head norm)     1 launch (Qwen3: 2)
    attention (store K/V, attend)              attention              2-3 launches
    o matmul                                   o matmul
    add residual; RMSNorm (~8 launches)        add_rms_norm           1 launch
    gate_up matmul; silu; mul                  gate_up matmul; swiglu 2 launches
    down matmul                                down matmul

A decode step of a 1B model runs ~11 launches a layer instead of ~30: at batch 1 each launch
costs the GPU a few microseconds even inside a CUDA graph, as much as reading the weights.
The residual add is deferred: a branch's output `h` is added to the stream `x` by the next
norm's kernel, which writes both the sum and its normalisation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from pie.engine.cuda.rms_norm import add_rms_norm, rms_norm
from pie.engine.cuda.rope import rope, rope_reference
from pie.engine.cuda.swiglu import swiglu
from pie.engine.cuda.triton_utils import pow2
from pie.engine.model import AttentionBackend, LlamaModel


class FusedLlamaModel(LlamaModel):
    """LlamaModel whose norms, residual adds, RoPE and SwiGLU run as Triton kernels."""

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
        n = tokens.shape[0]
        heads, kv_heads, dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = heads * dim, kv_heads * dim
        scale = dim**-0.5
        eps = cfg.rms_norm_eps
        # The kernel rotates with tl.arange(0, D): other head dims take the torch ops.
        rotate = rope if dim == pow2(dim) else rope_reference
        cos, sin = self.rope_cos, self.rope_sin
        x = F.embedding(tokens, self.embed)  # [T, hidden], the residual stream
        h: torch.Tensor | None = None  # the last branch output, not yet added to x
        k_caches = kv_cache[:, 0].unbind(0)  # per layer [P, page_size, KH, D]
        v_caches = kv_cache[:, 1].unbind(0)
        for layer, k_cache, v_cache in zip(self.layers, k_caches, v_caches, strict=True):
            if h is None:
                normed = rms_norm(x, layer.attn_norm, eps)
            else:
                normed, x = add_rms_norm(h, x, layer.attn_norm, eps)
            qkv = layer.qkv(normed)  # [T, (H + 2 KH) * D]
            v = qkv[:, q_size + kv_size :].view(n, kv_heads, dim)
            if layer.q_norm is not None and layer.k_norm is not None:  # Qwen3: norm, then rotate
                q = rotate(
                    qkv[:, :q_size].view(n, heads, dim), positions, cos, sin, layer.q_norm, eps
                )
                k_in = qkv[:, q_size : q_size + kv_size].view(n, kv_heads, dim)
                k = rotate(k_in, positions, cos, sin, layer.k_norm, eps)
            else:  # q and k rotate together: one launch for H + KH heads
                qk = rotate(
                    qkv[:, : q_size + kv_size].view(n, heads + kv_heads, dim), positions, cos, sin
                )
                q, k = qk[:, :heads], qk[:, heads:]
            o = attention.forward(q, k, v, k_cache, v_cache, meta, scale)  # [T, H, D]
            h = layer.o(o.reshape(n, q_size))
            normed, x = add_rms_norm(h, x, layer.mlp_norm, eps)
            h = layer.down(swiglu(layer.gate_up(normed)))
        if output_rows.numel() == 0:  # a prefill that only fills the cache needs no LM head
            return torch.empty((0, cfg.vocab_size), dtype=torch.float32, device=x.device)
        assert h is not None  # a model has at least one layer
        normed, _ = add_rms_norm(
            h.index_select(0, output_rows), x.index_select(0, output_rows), self.final_norm, eps
        )
        return self.lm_head(normed).float()
