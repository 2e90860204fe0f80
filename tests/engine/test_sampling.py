"""Tests of the batched samplers in pie.engine.sampling, on the CPU with synthetic logits.

Filters are checked against a brute-force float64 reference written independently of the code.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from pie.engine import sampling
from pie.engine.errors import InvalidBatchError
from pie.engine.request import (
    DistributionResult,
    Entropy,
    EntropyResult,
    Greedy,
    LogitsResult,
    LogProbs,
    LogProbsResult,
    RawLogits,
    Sample,
    SamplerSpec,
    TokenResult,
    TopKDistribution,
)
from pie.engine.sampling import sample

VOCAB = 64
DRAWS = 4000


def _logits(rows: int, vocab: int = VOCAB, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=gen) * scale


def _reference(
    row: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float
) -> np.ndarray:
    """The filtered distribution by the book: one token at a time, in float64."""
    z = row.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = sorted(range(len(p)), key=lambda t: -p[t])
    if top_k > 0:
        order = order[:top_k]
    head_mass = sum(p[t] for t in order)
    chosen: list[int] = []
    mass = 0.0
    for t in order:  # the smallest prefix whose (top-k renormalised) mass reaches top_p
        chosen.append(t)
        mass += p[t] / head_mass
        if mass >= top_p:
            break
    chosen = [t for t in chosen if p[t] >= min_p * p.max()]
    out = np.zeros_like(p)
    out[chosen] = p[chosen]
    return out / out.sum()


def _tv(a: np.ndarray, b: np.ndarray) -> float:
    return 0.5 * float(np.abs(a - b).sum())


def _tokens(results: list[Any]) -> list[int]:
    assert all(isinstance(r, TokenResult) for r in results)
    return [r.token_id for r in results]


# ---- greedy, logprobs, entropy, distribution -----------------------------------------------
@pytest.mark.parametrize("vocab", [VOCAB, 49152])
def test_greedy_is_argmax(vocab: int) -> None:
    x = _logits(6, vocab)
    assert _tokens(sample(x, [Greedy()] * 6)) == x.argmax(-1).tolist()


def test_greedy_breaks_ties_and_reads_nan_and_inf_as_torch_does() -> None:
    x = _logits(5, VOCAB)
    x[0, [7, 3, 40]] = 100.0  # tied maxima: the first wins
    x[1] = -math.inf  # nothing allowed
    x[2, [9, 30]] = math.nan  # NaN counts as the maximum
    x[3, 11] = math.inf
    with torch.inference_mode():  # as the engine calls it
        got = _tokens(sample(x, [Greedy()] * 5))  # every row, in order: no row copy
        some = _tokens(sample(x, [Greedy()] * 4 + [RawLogits()])[:4])  # rows picked out
    assert got == x.argmax(-1).tolist() == [3, 0, 9, 11, got[4]]
    assert some == got[:4]


@pytest.mark.parametrize("vocab", [VOCAB, 49152])
def test_logprobs_match_log_softmax(vocab: int) -> None:
    x = _logits(3, vocab)
    ids = [(0, 5, vocab - 1), (), (7,)]
    out = sample(x, [LogProbs(i) for i in ids])
    ref = torch.log_softmax(x.double(), -1)
    for row, (result, i) in enumerate(zip(out, ids, strict=True)):
        assert isinstance(result, LogProbsResult)
        np.testing.assert_allclose(result.logprobs, ref[row, list(i)].tolist(), atol=1e-5)


def test_entropy_is_minus_sum_p_log_p() -> None:
    x = _logits(4)
    x[3] = 0.0  # uniform: entropy ln(vocab)
    out = sample(x, [Entropy()] * 4)
    p = torch.softmax(x.double(), -1)
    ref = -(p * p.log()).sum(-1)
    assert all(isinstance(r, EntropyResult) for r in out)
    entropies = [r.entropy for r in out if isinstance(r, EntropyResult)]
    np.testing.assert_allclose(entropies, ref.numpy(), rtol=1e-5)
    assert entropies[3] == pytest.approx(math.log(VOCAB), rel=1e-6)


def test_distribution_is_sorted_top_k_of_full_softmax() -> None:
    x = _logits(3)
    specs = [TopKDistribution(5, 1.0), TopKDistribution(VOCAB, 0.7), TopKDistribution(1, 2.0)]
    out = sample(x, specs)
    for row, (spec, result) in enumerate(zip(specs, out, strict=True)):
        assert isinstance(result, DistributionResult)
        probs = torch.softmax(x[row].double() / spec.temperature, -1)
        ref_p, ref_ids = probs.topk(spec.k)
        assert result.token_ids == ref_ids.tolist()
        np.testing.assert_allclose(result.probs, ref_p.tolist(), rtol=1e-5)
        assert result.probs == sorted(result.probs, reverse=True)
    assert isinstance(out[1], DistributionResult)
    assert sum(out[1].probs) == pytest.approx(1.0, abs=1e-5)  # k = vocab covers all the mass


def test_distribution_at_temperature_zero_is_one_hot_on_argmax() -> None:
    x = _logits(1)
    (result,) = sample(x, [TopKDistribution(3, 0.0)])
    assert isinstance(result, DistributionResult)
    assert result.token_ids[0] == int(x.argmax())
    assert result.probs == [1.0, 0.0, 0.0]


def test_raw_logits_are_cpu_float32_copies() -> None:
    x = _logits(2).to(torch.bfloat16)
    out = sample(x, [RawLogits(), Greedy()])
    assert isinstance(out[0], LogitsResult)
    raw = out[0].logits
    assert isinstance(raw, torch.Tensor)
    assert raw.dtype == torch.float32 and raw.device.type == "cpu" and raw.shape == (VOCAB,)
    assert torch.equal(raw, x[0].float())


def test_low_precision_logits_are_computed_in_float32() -> None:
    x = _logits(1).to(torch.float16)
    (result,) = sample(x, [LogProbs((0, 1))])
    ref = torch.log_softmax(x.float(), -1)[0, :2]
    assert isinstance(result, LogProbsResult)
    np.testing.assert_allclose(result.logprobs, ref.tolist(), atol=1e-6)


# ---- random sampling ---------------------------------------------------------------------------
FILTERS = [  # temperature, top_k, top_p, min_p
    (1.0, 0, 1.0, 0.0),
    (1.0, 5, 1.0, 0.0),
    (0.8, 0, 0.7, 0.0),
    (1.0, 0, 1.0, 0.2),
    (1.3, 12, 0.8, 0.05),
    (0.6, 3, 0.5, 0.0),
]


@pytest.mark.parametrize(("temperature", "top_k", "top_p", "min_p"), FILTERS)
def test_sampled_tokens_follow_the_filtered_distribution(
    temperature: float, top_k: int, top_p: float, min_p: float
) -> None:
    x = _logits(1, seed=3)
    ref = _reference(x[0].numpy(), temperature, top_k, top_p, min_p)
    if (top_k, top_p, min_p) != (0, 1.0, 0.0):  # the filter matters, so the test can catch it
        assert _tv(ref, _reference(x[0].numpy(), temperature, 0, 1.0, 0.0)) > 0.1
    specs = [Sample(temperature, top_k, top_p, min_p, seed=s) for s in range(DRAWS)]
    drawn = _tokens(sample(x.expand(DRAWS, VOCAB), specs))
    assert set(drawn) <= set(np.flatnonzero(ref).tolist())
    empirical = np.bincount(drawn, minlength=VOCAB) / DRAWS
    assert _tv(empirical, ref) < 0.05


def test_large_vocab_top_k_top_p_draws_only_kept_tokens() -> None:
    vocab = 49152
    x = _logits(1, vocab, seed=5, scale=3.0)
    ref = _reference(x[0].numpy(), 0.9, 40, 0.9, 0.01)
    specs = [Sample(0.9, 40, 0.9, 0.01, seed=s) for s in range(64)]
    drawn = _tokens(sample(x.expand(64, vocab), specs))
    assert set(drawn) <= set(np.flatnonzero(ref).tolist())
    assert len(set(drawn)) > 1


@pytest.mark.parametrize("temperature", [0.0, 1e-7])
def test_temperature_zero_is_greedy(temperature: float) -> None:
    x = _logits(5)
    specs = [Sample(temperature, top_k=3, top_p=0.5, seed=i) for i in range(5)]
    assert _tokens(sample(x, specs)) == x.argmax(-1).tolist()


def test_seeded_rows_ignore_batch_position_and_composition() -> None:
    x = _logits(8, seed=1, scale=0.5)  # flat distributions: the seed decides the token
    specs = [Sample(1.0, 0, 0.95, 0.0, seed=100 + i) for i in range(8)]
    alone = [_tokens(sample(x[i : i + 1], [specs[i]]))[0] for i in range(8)]
    assert _tokens(sample(x, specs)) == alone
    assert len(set(alone)) > 1
    # Reversed order, padded with other kinds, some rows with masks of other rows: same tokens.
    mixed_x = torch.cat([x.flip(0), _logits(3, seed=9)])
    mixed_specs: list[SamplerSpec] = [*reversed(specs), Greedy(), Sample(0.5, seed=None), Entropy()]
    mask = np.ones(VOCAB, dtype=bool)
    mixed = sample(mixed_x, mixed_specs, [None] * 8 + [mask, mask, None])
    assert _tokens(mixed[:8]) == alone[::-1]


def test_different_seeds_give_different_draws() -> None:
    x = _logits(1, scale=0.5)
    drawn = _tokens(sample(x.expand(50, VOCAB), [Sample(seed=s) for s in range(50)]))
    assert len(set(drawn)) > 10
    again = _tokens(sample(x.expand(50, VOCAB), [Sample(seed=s) for s in range(50)]))
    assert drawn == again


def test_one_seed_draws_anew_at_each_position_and_the_same_again() -> None:
    """A seeded generation: each step (position) draws its own token, a rerun the same ones,
    whatever else shares the batch."""
    x = _logits(1, scale=0.5).expand(50, VOCAB)
    steps = list(range(100, 150))
    drawn = _tokens(sample(x, [Sample(seed=7)] * 50, positions=steps))
    assert len(set(drawn)) > 10
    assert _tokens(sample(x, [Sample(seed=7)] * 50, positions=steps)) == drawn
    one = _tokens(sample(x[:2], [Greedy(), Sample(seed=7)], positions=[3, steps[9]]))[1]
    assert one == drawn[9]
    # Position 0 (or no positions) draws what the seed alone drew before positions counted.
    assert _tokens(sample(x[:1], [Sample(seed=7)], positions=[0])) == _tokens(
        sample(x[:1], [Sample(seed=7)])
    )


# ---- logit masks ---------------------------------------------------------------------------------
def test_masks_restrict_every_sampler_kind() -> None:
    x = _logits(6)
    allowed = [3, 17, 40, 41]
    mask = np.zeros(VOCAB, dtype=bool)
    mask[allowed] = True
    before = x.clone()
    specs: list[SamplerSpec] = [
        Greedy(),
        Sample(seed=1),
        TopKDistribution(8),
        LogProbs((3, 4)),
        Entropy(),
        RawLogits(),
    ]
    out = sample(x, specs, [mask] * 6)
    assert torch.equal(x, before)  # the caller's logits are not modified

    sub = x[:, allowed].double()  # [6, 4]: the distribution restricted to allowed tokens
    assert out[0] == TokenResult(allowed[int(sub[0].argmax())])
    assert isinstance(out[1], TokenResult) and out[1].token_id in allowed
    dist = out[2]
    assert isinstance(dist, DistributionResult)
    assert sorted(dist.token_ids) == allowed  # fewer than k: only allowed tokens come back
    assert sum(dist.probs) == pytest.approx(1.0, abs=1e-6)
    lp = out[3]
    assert isinstance(lp, LogProbsResult)
    assert lp.logprobs[0] == pytest.approx(float(torch.log_softmax(sub[3], -1)[0]), abs=1e-5)
    assert lp.logprobs[1] == -math.inf
    p = torch.softmax(sub[4], -1)
    assert isinstance(out[4], EntropyResult)
    assert out[4].entropy == pytest.approx(float(-(p * p.log()).sum()), rel=1e-5)
    assert isinstance(out[5], LogitsResult)
    raw = out[5].logits
    assert isinstance(raw, torch.Tensor)
    assert torch.equal(raw[allowed], x[5, allowed]) and bool((raw[~mask] == -math.inf).all())


def test_masked_sampling_with_filters_only_draws_allowed_tokens() -> None:
    x = _logits(1, seed=4)
    mask = np.zeros(VOCAB, dtype=bool)
    mask[::3] = True
    ref = _reference(np.where(mask, x[0].numpy(), -np.inf), 1.0, 4, 0.9, 0.0)
    specs = [Sample(1.0, 4, 0.9, seed=s) for s in range(DRAWS)]
    drawn = _tokens(sample(x.expand(DRAWS, VOCAB), specs, [mask] * DRAWS))
    assert set(drawn) <= set(np.flatnonzero(ref).tolist())
    assert _tv(np.bincount(drawn, minlength=VOCAB) / DRAWS, ref) < 0.05


# ---- a mixed batch -----------------------------------------------------------------------------
def test_mixed_batch_returns_results_in_row_order() -> None:
    x = _logits(8)
    specs: list[SamplerSpec] = [
        Entropy(),
        Sample(0.7, 5, 0.9, 0.05, seed=7),
        Greedy(),
        LogProbs((1, 2)),
        TopKDistribution(3, 0.5),
        RawLogits(),
        Sample(1.0, min_p=0.1, seed=8),
        Sample(0.0),
    ]
    masks = [None, None, None, None, None, None, None, np.arange(VOCAB) % 2 == 0]
    out = sample(x, specs, masks)
    kinds = [EntropyResult, TokenResult, TokenResult, LogProbsResult, DistributionResult]
    kinds += [LogitsResult, TokenResult, TokenResult]
    assert [type(r) for r in out] == kinds
    for row, spec in enumerate(specs):  # each row equals, exactly, the row sampled on its own
        single = sample(x[row : row + 1], [spec], [masks[row]])[0]
        if isinstance(single, LogitsResult):
            batched = out[row]
            assert isinstance(batched, LogitsResult)
            assert torch.equal(single.logits, batched.logits)  # type: ignore[arg-type]
        else:
            assert out[row] == single


def test_empty_batch() -> None:
    assert sample(torch.empty(0, VOCAB), []) == []


# ---- one device -> host transfer -------------------------------------------------------------
class _DeviceStandIn(torch.Tensor):
    """A CPU tensor posing as a device tensor: records each call that would wait for the device."""

    reads: ClassVar[list[str]] = []
    _SYNCING: ClassVar[frozenset[str]] = frozenset(
        {
            "cpu",
            "item",
            "tolist",
            "numpy",
            "__bool__",
            "__int__",
            "__float__",
            "__index__",
            "__array__",
        }
    )

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        to_host = name == "to" and any(
            isinstance(a, torch.device | str) for a in (*args[1:], *kwargs.values())
        )
        if name in cls._SYNCING or to_host:
            cls.reads.append(name)
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **kwargs)
                # On the CPU .cpu() returns self: unwrap so later host-side reads are not counted.
                return out.as_subclass(torch.Tensor) if isinstance(out, torch.Tensor) else out
        return super().__torch_function__(func, types, args, kwargs)


def test_one_call_reads_the_device_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # The stand-in plays a device tensor on the CPU: greedy takes the device's argmax, not
    # the CPU's (numpy's, a host read only where the tensor already lives on the host).
    monkeypatch.setattr(sampling, "_argmax", lambda z: z.argmax(-1))
    x = _logits(7).as_subclass(_DeviceStandIn)
    specs: list[SamplerSpec] = [Greedy(), Sample(seed=1), Sample(0.5, 5, 0.8, 0.1)]
    specs += [TopKDistribution(4)]
    specs += [LogProbs((1, 2)), Entropy(), RawLogits()]
    mask = np.ones(VOCAB, dtype=bool)
    _DeviceStandIn.reads.clear()
    out = sample(x, specs, [mask, None, mask, None, None, None, None])
    assert _DeviceStandIn.reads == ["cpu"]
    assert len(out) == 7


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_call_synchronises_once() -> None:
    x = _logits(7).cuda()
    specs: list[SamplerSpec] = [Greedy(), Sample(seed=1), Sample(0.5, 5, 0.8, 0.1)]
    specs += [TopKDistribution(4)]
    specs += [LogProbs((1, 2)), Entropy(), RawLogits()]
    mask = np.ones(VOCAB, dtype=bool)
    sample(x, specs, [mask] + [None] * 6)  # warm up allocators
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gpu = sample(x, specs, [mask] + [None] * 6)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len([w for w in caught if "synchroniz" in str(w.message)]) == 1
    cpu = sample(x.cpu(), specs, [mask] + [None] * 6)
    assert gpu[0] == cpu[0] and gpu[1] == cpu[1]


# ---- validation --------------------------------------------------------------------------------
ONES = np.ones(VOCAB, dtype=bool)
INVALID = [
    ([Greedy()] * 2, None, "2 sampler specs for 3"),
    ([Greedy()] * 3, [ONES], "1 logit masks for 3"),
    ([Sample(-0.1), Greedy(), Greedy()], None, "temperature"),
    ([Sample(math.inf), Greedy(), Greedy()], None, "temperature"),
    ([Sample(math.nan), Greedy(), Greedy()], None, "temperature"),
    ([Sample(top_k=-1), Greedy(), Greedy()], None, "top_k"),
    ([Sample(top_p=0.0), Greedy(), Greedy()], None, "top_p"),
    ([Sample(top_p=1.5), Greedy(), Greedy()], None, "top_p"),
    ([Sample(min_p=1.0), Greedy(), Greedy()], None, "min_p"),
    ([Sample(min_p=-0.1), Greedy(), Greedy()], None, "min_p"),
    ([Greedy(), TopKDistribution(0), Greedy()], None, "row 1: distribution k"),
    ([Greedy(), TopKDistribution(VOCAB + 1), Greedy()], None, "distribution k"),
    ([Greedy(), TopKDistribution(3, -1.0), Greedy()], None, "temperature"),
    ([Greedy(), Greedy(), LogProbs((0, VOCAB))], None, "row 2: logprob token id 64"),
    ([Greedy(), Greedy(), LogProbs((-1,))], None, "logprob token id -1"),
    ([Greedy(), Greedy(), "greedy"], None, "unknown sampler str"),
    ([Greedy()] * 3, [None, np.ones(VOCAB - 1, dtype=bool), None], "shape"),
    ([Greedy()] * 3, [None, np.ones(VOCAB, dtype=np.int8), None], "bool array"),
    (
        [Greedy()] * 3,
        [None, None, np.zeros(VOCAB, dtype=bool)],
        "row 2: logit mask allows no token",
    ),
]


@pytest.mark.parametrize(("specs", "masks", "message"), INVALID)
def test_invalid_requests_raise_before_computing(
    specs: list[Any], masks: Any, message: str
) -> None:
    with pytest.raises(InvalidBatchError, match=message):
        sample(_logits(3), specs, masks)


def test_logits_must_be_a_2d_float_tensor() -> None:
    with pytest.raises(InvalidBatchError, match="2-D float"):
        sample(torch.zeros(VOCAB), [Greedy()])
    with pytest.raises(InvalidBatchError, match="2-D float"):
        sample(torch.zeros(1, VOCAB, dtype=torch.long), [Greedy()])
