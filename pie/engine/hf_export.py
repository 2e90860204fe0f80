"""A GGUF model rebuilt as an HF folder (config, safetensors, tokenizer), for HF-based peers.

HF transformers, lm-eval's `hf` model, aiperf and `transformers serve` read only HF folders;
this writes one from what the engine itself loads (the dequantized weights with the GGUF's Q/K
row interleave already undone by `pie.engine.loader`, and our tokenizer's backend), so both
sides run the very same weights and token ids.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from pie.engine.config import ModelConfig
from pie.engine.errors import ModelLoadError
from pie.engine.loader import GLOBAL_TENSORS, LAYER_TENSORS, LoadedModel, load_model
from pie.engine.tokenizer import Tokenizer

ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}
FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def hf_config(config: ModelConfig, tokenizer: Tokenizer, dtype: torch.dtype) -> dict[str, Any]:
    """config.json for `config` in the layout every transformers >= 4.40 reads."""
    architecture, model_type = ARCHITECTURES[config.family]
    out: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "max_position_embeddings": config.max_position,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if config.family in ("mistral", "qwen2", "qwen3"):
        out["sliding_window"] = None
        out["use_sliding_window"] = False
    return out


def hf_state_dict(model: LoadedModel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our weight names -> HF's (`layers.3.wq` -> `model.layers.3.self_attn.q_proj.weight`)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.weights.items():
        if key.startswith("layers."):
            _, index, short = key.split(".")
            name = LAYER_TENSORS[short][1].format(i=index)
        else:
            name = GLOBAL_TENSORS[key][1]
        # safetensors refuses non-contiguous tensors
        out[name] = tensor.detach().to(dtype).contiguous()
    if model.config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def tokenizer_config(tokenizer: Tokenizer, max_length: int) -> dict[str, Any]:
    """tokenizer_config.json: special tokens and the chat template; tokenizer.json does the rest.

    The class is the generic fast tokenizer, so transformers uses tokenizer.json as written
    (a model-specific class may rebuild its own pre-tokenizer and split digits differently).
    """

    def token(token_id: int | None) -> str | None:
        return None if token_id is None else tokenizer.id_to_token(token_id)

    out: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token(tokenizer.bos_token_id),
        "eos_token": token(tokenizer.eos_token_id),
        "pad_token": token(tokenizer.eos_token_id),
        "add_bos_token": tokenizer.add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # our decode never rewrites spaces
        "model_max_length": max_length,
    }
    if tokenizer.chat_template is not None:
        out["chat_template"] = tokenizer.chat_template
    return out


def generation_config(tokenizer: Tokenizer) -> dict[str, Any]:
    """generation_config.json: HF's generate stops on the tokens ours stops on."""
    stops = sorted(tokenizer.stop_token_ids)
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": stops[0] if len(stops) == 1 else stops,
        "pad_token_id": tokenizer.eos_token_id,
        "do_sample": False,
    }


def export_hf(
    model_path: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Writes the HF folder of a GGUF (None: the embedded default model); returns the folder."""
    from safetensors.torch import save_file

    model = load_model(model_path)
    if model.gguf_file is None:
        raise ModelLoadError(f"{model.source} is already an HF folder: use it as it is")
    if model.config.family in ("llama", "mistral") and model.config.rope_scaling is not None:
        raise ModelLoadError("RoPE scaling cannot be exported yet")
    tokenizer = Tokenizer.from_gguf(model.gguf_file)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = hf_state_dict(model, dtype)
    del model.weights  # the float32 copies: the export may be the process's largest allocation
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    del weights
    tokenizer.backend.save(str(out / "tokenizer.json"))
    files = {
        "config.json": hf_config(model.config, tokenizer, dtype),
        "tokenizer_config.json": tokenizer_config(tokenizer, model.config.max_position),
        "generation_config.json": generation_config(tokenizer),
    }
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    return out
