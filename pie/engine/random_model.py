"""Llama- and Qwen3-shaped models with seeded random weights, for tests and benchmarks.

Nothing is downloaded: transformers' config classes describe real shapes (Llama 3.2 1B, Llama 3.1
8B, Qwen3 0.6B) or tiny ones for CPU tests, and one seeded generator fills the weights under our
canonical names (pie.engine.loader). The HF model, when asked for, holds those same tensors, so
our engine and HF run identical weights. Scales follow model-notes.md: the default init (std
0.02) makes attention nearly uniform and hides RoPE and mask bugs, so q/k are scaled up until
attention logits spread over several units (a typical query gives ~1/3 of its weight to one
slot). Each layer's output projections are scaled by 1/sqrt(2 * layers), as GPT-2 does, so the
residual stream stays dominated by the embedding: without it a deep random net is chaotic and
bf16 rounding alone moves its logits by >5% (measured: 5.9% at 16 layers, 1.3% with it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pie.engine.config import ModelConfig, config_from_hf
from pie.engine.linear import Linear
from pie.engine.loader import GLOBAL_TENSORS, LAYER_TENSORS
from pie.engine.model import AttentionBackend, LlamaModel

if TYPE_CHECKING:
    from pie.engine.engine import Engine

# Attention logits q.k/sqrt(D) get a spread of about QK_GAIN**2: q and k entries have std
# QK_GAIN (their inputs are RMS-normalised), so a random pair's logit has std QK_GAIN**2.
QK_GAIN = 1.6
LOGIT_GAIN = 3.0  # std of the output logits


@dataclass(frozen=True)
class ModelShape:
    family: str  # "llama" | "qwen3"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    vocab: int
    rope_theta: float = 500000.0
    # Llama 3 frequency scaling (factor, original context), or None for plain RoPE
    llama3_scaling: tuple[float, int] | None = None
    max_position: int = 8192
    tie_embeddings: bool = False
    rms_eps: float = 1e-5


SHAPES: dict[str, ModelShape] = {
    # CPU test shapes: big enough for GQA, several pages and a planted RoPE bug to show
    "tiny": ModelShape("llama", 64, 2, 4, 2, 16, 128, 256, rope_theta=10000.0, max_position=512),
    "tiny-qwen3": ModelShape(
        "qwen3", 64, 2, 4, 2, 32, 96, 256, rope_theta=1e6, max_position=512, tie_embeddings=True
    ),
    "llama-1b": ModelShape(
        "llama",
        hidden=2048,
        layers=16,
        heads=32,
        kv_heads=8,
        head_dim=64,
        mlp=8192,
        vocab=128256,
        llama3_scaling=(32.0, 8192),
        max_position=131072,
        tie_embeddings=True,
    ),
    "llama-8b": ModelShape(
        "llama",
        hidden=4096,
        layers=32,
        heads=32,
        kv_heads=8,
        head_dim=128,
        mlp=14336,
        vocab=128256,
        llama3_scaling=(8.0, 8192),
        max_position=131072,
    ),
    "qwen3-0.6b": ModelShape(
        "qwen3",
        hidden=1024,
        layers=28,
        heads=16,
        kv_heads=8,
        head_dim=128,
        mlp=3072,
        vocab=151936,
        rope_theta=1e6,
        max_position=40960,
        tie_embeddings=True,
        rms_eps=1e-6,
    ),
}


@dataclass
class RandomModel:
    shape: ModelShape
    hf_config: Any  # transformers.PretrainedConfig
    config: ModelConfig  # ours, parsed from the HF config as a loaded folder would be
    weights: dict[str, torch.Tensor]  # canonical names, on the requested device and dtype


def hf_config(shape: ModelShape) -> Any:
    """transformers' config for this shape (LlamaConfig or Qwen3Config)."""
    from transformers import LlamaConfig, Qwen3Config

    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": shape.rope_theta}
    if shape.llama3_scaling is not None:
        factor, original = shape.llama3_scaling
        rope = {
            "rope_type": "llama3",
            "rope_theta": shape.rope_theta,
            "factor": factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": original,
        }
    common: dict[str, Any] = {
        "vocab_size": shape.vocab,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.mlp,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "max_position_embeddings": shape.max_position,
        "rms_norm_eps": shape.rms_eps,
        "tie_word_embeddings": shape.tie_embeddings,
        "rope_parameters": rope,
    }
    if shape.family == "qwen3":
        return Qwen3Config(architectures=["Qwen3ForCausalLM"], **common)
    if shape.family == "llama":
        return LlamaConfig(architectures=["LlamaForCausalLM"], **common)
    raise ValueError(f"unknown family {shape.family!r}: choose llama or qwen3")


def random_weights(
    shape: ModelShape, seed: int, device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Seeded weights under canonical names, drawn in float32 on `device` (an 8B model takes
    seconds on a GPU, minutes on a CPU) and then cast: one seed and device, one model."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def normal(rows: int, cols: int, std: float) -> torch.Tensor:
        t = torch.empty(rows, cols, device=device).normal_(0.0, std, generator=gen)
        return t.to(dtype)

    def gains(n: int, mean: float) -> torch.Tensor:  # norm weights near `mean`, not all equal
        t = torch.empty(n, device=device).normal_(mean, 0.1 * mean, generator=gen)
        return t.to(dtype)

    h, d, qk_norm = shape.hidden, shape.head_dim, shape.family == "qwen3"
    # With q/k norm the projections' scale is normalised away; the norm weights carry the gain.
    qk_std = (1.0 if qk_norm else QK_GAIN) / math.sqrt(h)
    out_std = 1.0 / math.sqrt(2 * shape.layers)  # residual branches, see the module docstring
    # Logits have std LOGIT_GAIN: through lm_head's scale, or, when the embedding is also the
    # output layer (tied, std 1), through the final norm's weights.
    final_gain = LOGIT_GAIN / math.sqrt(h) if shape.tie_embeddings else 1.0
    w: dict[str, torch.Tensor] = {
        "embed": normal(shape.vocab, h, 1.0),
        "final_norm": gains(h, final_gain),
    }
    for i in range(shape.layers):
        p = f"layers.{i}."
        w[p + "attn_norm"] = gains(h, 1.0)
        w[p + "wq"] = normal(shape.heads * d, h, qk_std)
        w[p + "wk"] = normal(shape.kv_heads * d, h, qk_std)
        w[p + "wv"] = normal(shape.kv_heads * d, h, 1.0 / math.sqrt(h))
        w[p + "wo"] = normal(h, shape.heads * d, out_std / math.sqrt(shape.heads * d))
        if qk_norm:
            w[p + "q_norm"] = gains(d, QK_GAIN)
            w[p + "k_norm"] = gains(d, QK_GAIN)
        w[p + "mlp_norm"] = gains(h, 1.0)
        w[p + "w_gate"] = normal(shape.mlp, h, 1.0 / math.sqrt(h))
        w[p + "w_up"] = normal(shape.mlp, h, 1.0 / math.sqrt(h))
        w[p + "w_down"] = normal(h, shape.mlp, out_std / math.sqrt(shape.mlp))
    if not shape.tie_embeddings:
        w["lm_head"] = normal(shape.vocab, h, LOGIT_GAIN / math.sqrt(h))
    return w


def build(
    shape: ModelShape | str,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> RandomModel:
    """Config and seeded weights of `shape` (a ModelShape or a name in SHAPES)."""
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ValueError(f"unknown model shape {shape!r}: choose from {', '.join(SHAPES)}")
        shape = SHAPES[shape]
    cfg = hf_config(shape)
    ours = config_from_hf(
        cfg.to_dict(), name=f"random-{shape.family}-{shape.hidden}x{shape.layers}"
    )
    weights = random_weights(shape, seed, torch.device(device), dtype)
    return RandomModel(shape, cfg, ours, weights)


def weights_of(model: LlamaModel) -> dict[str, torch.Tensor]:
    """Canonical weights of a built model as views of its fused matrices, so an HF model can
    share the memory of ours (q/k/v and gate/up are row ranges of one matrix). Where the CPU
    float32 kernels hold a weight only in their packed layout, its view is of an unpacked copy."""
    cfg = model.config
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    lm_head = _matrix(model.lm_head)
    out = {"embed": model.embed, "final_norm": model.final_norm}
    if not cfg.tie_word_embeddings:  # tied: the LM head is the embedding (or its copy)
        out["lm_head"] = lm_head
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}."
        qkv, gate_up = _matrix(layer.qkv), _matrix(layer.gate_up)
        out[p + "attn_norm"], out[p + "mlp_norm"] = layer.attn_norm, layer.mlp_norm
        out[p + "wq"], out[p + "wk"], out[p + "wv"] = qkv[:q], qkv[q : q + kv], qkv[q + kv :]
        out[p + "wo"], out[p + "w_down"] = _matrix(layer.o), _matrix(layer.down)
        out[p + "w_gate"], out[p + "w_up"] = gate_up.chunk(2)
        if layer.q_norm is not None and layer.k_norm is not None:
            out[p + "q_norm"], out[p + "k_norm"] = layer.q_norm, layer.k_norm
        if layer.qkv.bias is not None:
            out[p + "bq"], out[p + "bk"] = layer.qkv.bias[:q], layer.qkv.bias[q : q + kv]
            out[p + "bv"] = layer.qkv.bias[q + kv :]
    return out


def _matrix(linear: Linear) -> torch.Tensor:
    weight = linear.unpacked()
    if weight is None:
        raise ValueError(
            "this model's weights were repacked for the CPU kernels; build it on CUDA or in "
            "float32 to share its weights with an HF model"
        )
    return weight


def make_engine(
    model: LlamaModel,
    *,
    num_pages: int,
    page_size: int = 16,
    attention: AttentionBackend | None = None,
) -> Engine:
    """An Engine over a built model; random weights have no tokenizer, so it has none."""
    from pie.engine.engine import Engine

    tokenizer: Any = None
    return Engine(model, tokenizer, num_pages=num_pages, page_size=page_size, attention=attention)


def hf_model(model: RandomModel, attn_implementation: str = "sdpa") -> Any:
    """The transformers model of `model`, its parameters being the very tensors of `weights`."""
    from transformers import AutoModelForCausalLM

    some = next(iter(model.weights.values()))
    with torch.device(some.device):
        hf = AutoModelForCausalLM.from_config(
            model.hf_config, dtype=some.dtype, attn_implementation=attn_implementation
        )
    state = {}
    for ours, (_, hf_name) in GLOBAL_TENSORS.items():
        if ours in model.weights:
            state[hf_name] = model.weights[ours]
    for i in range(model.shape.layers):
        for ours, (_, hf_name) in LAYER_TENSORS.items():
            key = f"layers.{i}.{ours}"
            if key in model.weights:
                state[hf_name.format(i=i)] = model.weights[key]
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (m == "lm_head.weight" and model.shape.tie_embeddings)]
    if missing or unexpected:
        raise RuntimeError(
            f"weights do not fit the HF model: missing {missing}, unexpected {unexpected}"
        )
    if model.shape.tie_embeddings:
        hf.tie_weights()
    hf.eval()
    return hf
