"""Model hyper-parameters, read from GGUF metadata or an HF config.json.

One frozen record feeds the loader and the model; every supported architecture is a Llama
variant told apart by a few switches (qkv bias, q/k norm, RoPE scaling).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pie.engine.errors import ModelLoadError

# HF `architectures` / `model_type` names -> our family name. Dispatch on these, never on tensor
# names: Gemma shares Llama's tensor names but not its maths.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
SUPPORTED_GGUF_ARCHITECTURES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
}


@dataclass(frozen=True)
class ModelConfig:
    family: str  # "llama" | "mistral" | "qwen2" | "qwen3"
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # Qwen2: bias on q, k and v projections
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    rope_scaling: dict[str, Any] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"{self.num_heads} attention heads is not a multiple of {self.num_kv_heads} KV heads"
            )


def unsupported(what: str) -> ModelLoadError:
    names = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
    return ModelLoadError(
        f"unsupported model architecture {what!r}: Pie supports the Llama family ({names})"
    )


def config_from_hf(cfg: dict[str, Any], name: str) -> ModelConfig:
    """Build from a config.json dict; reads both the pre-5 and the transformers-5 layouts."""
    archs = cfg.get("architectures") or []
    family = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if family is None:
        family = SUPPORTED_MODEL_TYPES.get(cfg.get("model_type", ""))
    if family is None:
        raise unsupported(archs[0] if archs else cfg.get("model_type", "<missing>"))
    # transformers 5 nests RoPE settings in `rope_parameters`; older files keep `rope_theta` and
    # `rope_scaling` at top level. A loader that knows one layout silently falls back to 10000.
    rope = dict(cfg.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0
    scaling = cfg.get("rope_scaling") or (rope if rope else None)
    if scaling is not None:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type == "default":
            scaling = None
        elif rope_type != "llama3":
            raise ModelLoadError(f"unsupported RoPE scaling {rope_type!r}: Pie supports 'llama3'")
    heads = cfg["num_attention_heads"]
    hidden = cfg["hidden_size"]
    return ModelConfig(
        family=family,
        name=name,
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        max_position=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
        qk_norm=family == "qwen3",
        rope_scaling=scaling,
    )


def config_from_gguf(meta: dict[str, Any], has_output_tensor: bool, name: str) -> ModelConfig:
    """Build from GGUF key/values (`<arch>.block_count`, ...)."""
    arch = meta.get("general.architecture", "<missing>")
    family = SUPPORTED_GGUF_ARCHITECTURES.get(arch)
    if family is None:
        raise unsupported(arch)

    def key(suffix: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{suffix}", default)
        if value is None:
            raise ModelLoadError(f"GGUF metadata lacks {arch}.{suffix}")
        return value

    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    scaling = None
    if meta.get(f"{arch}.rope.scaling.type") == "llama3" or f"{arch}.rope.scaling.factor" in meta:
        raise ModelLoadError("GGUF RoPE scaling is not supported yet: load the HF folder instead")
    return ModelConfig(
        family=family,
        name=name,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=int(meta.get(f"{arch}.attention.key_length") or hidden // heads),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        max_position=int(key("context_length")),
        tie_word_embeddings=not has_output_tensor,
        attention_bias=family == "qwen2",
        qk_norm=family == "qwen3",
        rope_scaling=scaling,
    )
