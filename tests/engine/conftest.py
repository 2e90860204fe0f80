"""Shared fixtures for engine tests: the real embedded model, ours and HF's, in float32."""

from __future__ import annotations

import pytest
import torch

from pie.engine.engine import Engine
from pie.engine.loader import default_model_path


@pytest.fixture(scope="session")
def engine_f32() -> Engine:
    return Engine.load(None, dtype=torch.float32, num_pages=256, page_size=16)


@pytest.fixture(scope="session")
def hf_model():  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    model.eval()
    return model


@pytest.fixture()
def fresh_cache(engine_f32: Engine) -> Engine:
    """The shared engine with its KV cache zeroed, so tests cannot see each other's pages."""
    engine_f32.kv_cache.zero_()
    return engine_f32
