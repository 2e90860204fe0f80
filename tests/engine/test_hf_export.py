"""`pie export-hf`: the HF folder gives transformers our logits, token ids and chat prompt."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from pie.cli import main
from pie.engine.engine import Engine
from pie.engine.loader import load_model
from pie.engine.request import ForwardBatch, RawLogits, SequenceForward

TOL = 1e-3  # float32 on both sides; eager vs sdpa inside HF differ by < 1e-4 on this model
TEXTS = [
    "The capital of France is",
    "Digits split one by one: 1234567 and 3.14159",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "  leading spaces,\ttabs\t\tand\n\nnewlines; accents é ü and 日本語 ✓",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hf-export") / "smollm2"
    assert main(["export-hf", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def hf_export_model(hf_folder: Path):  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_folder), dtype=torch.float32)
    return model.eval()


def test_folder_has_every_file_and_our_config(hf_folder: Path, engine_f32: Engine) -> None:
    names = {p.name for p in hf_folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    config = json.loads((hf_folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    # our own loader reads the folder back to the GGUF's hyper-parameters
    again = load_model(hf_folder).config
    assert again == dataclasses.replace(load_model(None).config, name=again.name)


def test_logits_equal_the_engines(hf_export_model, engine_f32: Engine) -> None:  # type: ignore[no-untyped-def]
    tok = engine_f32.tokenizer
    worst = 0.0
    for text in TEXTS[:2] + TEXTS[4:]:
        tokens = tok.encode(text)
        n = len(tokens)
        forward = SequenceForward(
            tokens=tokens,
            positions=list(range(n)),
            page_ids=list(range(100, 100 + (n + 15) // 16)),
            context_len=0,
            outputs=[(i, RawLogits()) for i in range(n)],
        )
        ours = engine_f32.forward_logits(ForwardBatch([forward]))
        with torch.no_grad():
            ref = hf_export_model(torch.tensor([tokens])).logits[0].float()
        worst = max(worst, (ours - ref).abs().max().item())
    assert worst < TOL


def test_tokenizer_gives_our_ids_and_text(hf_folder: Path, engine_f32: Engine) -> None:
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(hf_folder))
    ours = engine_f32.tokenizer
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=True)
        assert hf_tok(text)["input_ids"] == ids
        assert hf_tok.decode(ids) == ours.decode(ids) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert hf_tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    ) == ours.apply_chat_template(messages)
    stops = json.loads((hf_folder / "generation_config.json").read_text())["eos_token_id"]
    assert set(stops if isinstance(stops, list) else [stops]) == set(ours.stop_token_ids)
