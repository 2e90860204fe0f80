"""Random-weight models of tiny shape: our engine equals HF on them, and their scales make the
comparison sharp enough that a planted RoPE bug fails it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pie.engine import random_model
from pie.engine.config import config_from_hf
from pie.engine.model import LlamaModel
from pie.engine.request import ForwardBatch, RawLogits, SequenceForward

pytest.importorskip("transformers")

TOL = 1e-3  # float32, as for the real model
PAGE = 16
CPU = torch.device("cpu")


def sequence(
    tokens: list[int], pages: list[int], ctx: int, mask: np.ndarray | None = None
) -> SequenceForward:
    n = len(tokens)
    return SequenceForward(
        tokens=tokens,
        positions=list(range(ctx, ctx + n)),
        page_ids=pages,
        context_len=ctx,
        outputs=[(i, RawLogits()) for i in range(n)],
        attention_mask=mask,
    )


def engine_logits(model: LlamaModel, tokens: list[int]) -> torch.Tensor:
    """Prefill 30 tokens (two pages), then decode the rest one at a time: logits of every token."""
    engine = random_model.make_engine(model, num_pages=8, page_size=PAGE)
    pages = [5, 2, 7, 1]
    steps = [engine.forward_logits(ForwardBatch([sequence(tokens[:30], pages, 0)]))]
    for i in range(30, len(tokens)):
        steps.append(engine.forward_logits(ForwardBatch([sequence(tokens[i : i + 1], pages, i)])))
    return torch.cat(steps)


def hf_logits(hf: object, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()  # type: ignore[operator]


@pytest.fixture(scope="module", params=["tiny", "tiny-qwen3"])
def built(request: pytest.FixtureRequest) -> random_model.RandomModel:
    return random_model.build(request.param, seed=0)


@pytest.fixture(scope="module")
def hf(built: random_model.RandomModel) -> object:
    return random_model.hf_model(built)


@pytest.fixture(scope="module")
def tokens(built: random_model.RandomModel) -> list[int]:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, built.shape.vocab, (40,), generator=gen).tolist()


def test_engine_matches_hf_float32(
    built: random_model.RandomModel, hf: object, tokens: list[int]
) -> None:
    ours = engine_logits(LlamaModel(built.config, built.weights, CPU, torch.float32), tokens)
    ref = hf_logits(hf, tokens)
    assert (ours - ref).abs().max().item() < TOL
    assert ref.std().item() > 1.0  # logits spread: a wrong row cannot hide in a flat softmax


def test_planted_rope_bug_is_caught(
    built: random_model.RandomModel, hf: object, tokens: list[int]
) -> None:
    wrong = dataclasses.replace(built.config, rope_theta=built.config.rope_theta * 2)
    ours = engine_logits(LlamaModel(wrong, built.weights, CPU, torch.float32), tokens)
    ref = hf_logits(hf, tokens)
    # the bug must exceed the tolerance by far, not by luck
    assert (ours - ref).abs().max().item() > 100 * TOL


def test_attention_is_far_from_uniform(built: random_model.RandomModel, tokens: list[int]) -> None:
    hf = random_model.hf_model(built, attn_implementation="eager")
    with torch.no_grad():
        out = hf(torch.tensor([tokens]), output_attentions=True)
    probs = out.attentions[-1][0, :, 16:]  # [H, queries with >= 17 slots, slots]
    # uniform attention would give each query's top slot at most 1/17 of its weight
    assert probs.max(-1).values.median().item() > 0.2


def test_weights_of_shares_the_models_memory(built: random_model.RandomModel) -> None:
    model = LlamaModel(built.config, built.weights, CPU, torch.float32)
    views = random_model.weights_of(model)
    assert views.keys() == built.weights.keys()
    for name, tensor in built.weights.items():
        assert torch.equal(views[name], tensor), name
    assert views["layers.0.wk"].data_ptr() != built.weights["layers.0.wk"].data_ptr()
    qkv = model.layers[0].qkv
    if qkv.weight is not None:  # not repacked for the float32 CPU kernels: a view, no copy
        assert views["layers.0.wk"].untyped_storage().data_ptr() == qkv.weight.data_ptr()
    wq, wv = views["layers.0.wq"], views["layers.0.wv"]
    assert wq.untyped_storage().data_ptr() == wv.untyped_storage().data_ptr()


def test_shapes_parse_into_our_config() -> None:
    cfg = random_model.build("tiny-qwen3").config
    assert cfg.family == "qwen3" and cfg.qk_norm and cfg.head_dim == 32
    shape = random_model.SHAPES["llama-8b"]
    ours = config_from_hf(random_model.hf_config(shape).to_dict(), name="x")
    assert (ours.hidden_size, ours.num_layers, ours.intermediate_size) == (4096, 32, 14336)
    assert ours.rope_scaling is not None and ours.rope_scaling["factor"] == 8.0
