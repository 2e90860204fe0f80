"""Samplers on device: turn the forward pass's next-token logit rows into tokens and scores.

The engine calls `sample` once per batch; rows are grouped by sampler kind, each group runs as
batched tensor ops on the logits' device, and every result reaches the host in one transfer.

Logit masks (True = allowed) apply to every kind, so a grammar-constrained row's greedy token,
sampled token, distribution, log-probabilities, entropy and raw logits all describe the same
constrained distribution: disallowed tokens read -inf as logits and logprobs, 0 as probability.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
import torch

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
    SampleResult,
    SamplerSpec,
    TokenResult,
    TopKDistribution,
)

# Below this temperature x / t can overflow float32, so such rows act as temperature 0 (as vLLM).
MIN_TEMPERATURE = 1e-5
# Token ids travel to the host inside the float32 result buffer: exact below 2**24.
_MAX_VOCAB = 1 << 24
_SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed accepts

# Rows without a seed draw from this process-wide generator, seeded from OS entropy so runs differ.
_unseeded = torch.Generator()
_unseeded.seed()
_unseeded_lock = threading.Lock()

Unpack = Callable[[torch.Tensor], list[SampleResult]]


@dataclass(slots=True)
class _Group:
    """Rows of one sampler kind with their host-side parameters (column 0: the logit row)."""

    kind: str
    rows: list[int]
    specs: list[SamplerSpec]
    table: np.ndarray  # [G, P] float64


def sample(
    logits: torch.Tensor,
    specs: Sequence[SamplerSpec],
    logit_masks: Sequence[np.ndarray | None] | None = None,
    positions: Sequence[int] | None = None,
) -> list[SampleResult]:
    """Apply specs[i] to logits[i] (masked by logit_masks[i]); results come back in row order.

    logits: [N, vocab], any device and float dtype (computed in float32). positions[i] is the
    position of the token whose next-token distribution row i is: a seeded sampler's draw
    depends on its seed and that position (so each step of a seeded generation draws anew,
    the same way in any batch); None counts as position 0. Raises InvalidBatchError before any
    computation if a spec or mask is malformed.
    """
    _validate(logits, specs, logit_masks)
    if len(specs) == 0:
        return []
    unmasked = logit_masks is None or all(m is None for m in logit_masks)
    if unmasked and all(isinstance(s, Greedy) for s in specs):
        # the plain decode step: one argmax, one transfer, no planning (batch 1: 200 -> 40 us)
        with torch.no_grad():
            return [TokenResult(int(i)) for i in _argmax(logits.float()).tolist()]
    with torch.no_grad():
        x = _apply_masks(logits.float(), logit_masks)  # [N, V]
        groups = _plan(specs, positions)
        # One upload for all groups' parameters; each group reads its own view.
        sizes = [g.table.size for g in groups]
        flat_params = torch.from_numpy(np.concatenate([g.table.ravel() for g in groups]))
        params = _to_device(flat_params, x.device).split(sizes)
        outs: list[torch.Tensor] = []
        unpacks: list[Unpack] = []
        for group, p in zip(groups, params, strict=True):
            out, unpack = _KERNELS[group.kind](x, p.view(group.table.shape), group)
            outs.append(out)
            unpacks.append(unpack)
        # The single device -> host transfer of this call: every group's float32 results.
        host = torch.cat(outs).cpu()
    results: list[SampleResult | None] = [None] * len(specs)
    for group, unpack, chunk in zip(
        groups, unpacks, host.split([o.numel() for o in outs]), strict=True
    ):
        for row, result in zip(group.rows, unpack(chunk), strict=True):
            results[row] = result
    return [r for r in results if r is not None]


# ---- planning (host) ---------------------------------------------------------------------------
def _kind(spec: SamplerSpec) -> str:
    if isinstance(spec, Sample):
        if spec.temperature < MIN_TEMPERATURE:
            return "greedy"
        return "sample_sorted" if spec.top_k > 0 or spec.top_p < 1.0 else "sample"
    return next(kind for cls, kind in _SIMPLE_KINDS if isinstance(spec, cls))


_SIMPLE_KINDS: tuple[tuple[type, str], ...] = (
    (Greedy, "greedy"),
    (TopKDistribution, "distribution"),
    (LogProbs, "logprobs"),
    (Entropy, "entropy"),
    (RawLogits, "raw"),
)


def _plan(specs: Sequence[SamplerSpec], positions: Sequence[int] | None) -> list[_Group]:
    buckets: dict[str, list[int]] = {}
    for row, spec in enumerate(specs):
        buckets.setdefault(_kind(spec), []).append(row)
    groups = []
    for kind, rows in buckets.items():
        group_specs = [specs[r] for r in rows]
        steps = [0] * len(rows) if positions is None else [int(positions[r]) for r in rows]
        groups.append(_Group(kind, rows, group_specs, _table(kind, rows, group_specs, steps)))
    return groups


def _table(kind: str, rows: list[int], specs: list[SamplerSpec], steps: list[int]) -> np.ndarray:
    table: list[list[float]]
    if kind in ("sample", "sample_sorted"):
        draws = [s for s in specs if isinstance(s, Sample)]
        u = _uniforms([s.seed for s in draws], steps)
        table = [
            [r, s.temperature, s.top_k, s.top_p, s.min_p, ui]
            for r, s, ui in zip(rows, draws, u, strict=True)
        ]
    elif kind == "distribution":
        dists = [s for s in specs if isinstance(s, TopKDistribution)]
        table = [[r, s.temperature] for r, s in zip(rows, dists, strict=True)]
    elif kind == "logprobs":
        ids = [list(s.token_ids) for s in specs if isinstance(s, LogProbs)]
        width = max(len(i) for i in ids)
        table = [[r, *i, *[0] * (width - len(i))] for r, i in zip(rows, ids, strict=True)]
    else:
        table = [[r] for r in rows]
    return np.asarray(table, dtype=np.float64)


# Spreads positions over the seed space (the 64-bit golden-ratio constant, as splitmix64 does).
_STEP = 0x9E3779B97F4A7C15


def _uniforms(seeds: list[int | None], steps: list[int]) -> list[float]:
    """One uniform in [0, 1) per row; a seeded row's depends on its seed and step (position)
    alone, not on the batch; at step 0 on the seed alone."""
    out = [0.0] * len(seeds)
    unseeded = [i for i, s in enumerate(seeds) if s is None]
    if unseeded:
        with _unseeded_lock:
            draws = torch.rand(len(unseeded), generator=_unseeded, dtype=torch.float64).tolist()
        for i, u in zip(unseeded, draws, strict=True):
            out[i] = u
    for i, (seed, step) in enumerate(zip(seeds, steps, strict=True)):
        if seed is not None:
            mixed = seed if step == 0 else (seed + step * _STEP) % (1 << 64)
            gen = torch.Generator().manual_seed(mixed)
            out[i] = torch.rand(1, generator=gen, dtype=torch.float64).item()
    return out


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without waiting for queued GPU work (pinned source, non_blocking copy)."""
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def _apply_masks(x: torch.Tensor, masks: Sequence[np.ndarray | None] | None) -> torch.Tensor:
    rows = [i for i, m in enumerate(masks or ()) if m is not None]
    if not rows:
        return x
    present = [m for m in masks or () if m is not None]
    allowed = _to_device(torch.from_numpy(np.stack(present)), x.device)  # [M, V]
    idx = _to_device(torch.tensor(rows, dtype=torch.long), x.device)  # [M]
    # Out of place: the caller's logits stay untouched.
    return x.index_put((idx,), x.index_select(0, idx).masked_fill(~allowed, -math.inf))


# ---- kernels (device): each returns a float32 1-D result and how to read it on the host --------
def _rows(x: torch.Tensor, params: torch.Tensor, group: _Group) -> torch.Tensor:
    """The group's rows of x [N, V]: x itself when the group is every row in order (no kernel
    writes into its rows, so no copy is needed; at batch 32 the copy took 0.5 ms)."""
    if len(group.rows) == x.shape[0] and group.rows == list(range(x.shape[0])):
        return x
    return x.index_select(0, params[:, 0].long())  # [G, V]


def _argmax(z: torch.Tensor) -> torch.Tensor:  # [G, V] -> [G] int64
    if z.device.type == "cpu":
        # numpy's argmax is vectorized where torch's CPU one is not (32 x 49152 float32:
        # 0.16 vs 2.0 ms); both give the first maximal index, a NaN counting as maximal.
        return torch.from_numpy(np.argmax(z.numpy(), axis=-1))
    return z.argmax(-1)


def _greedy(x: torch.Tensor, params: torch.Tensor, group: _Group) -> tuple[torch.Tensor, Unpack]:
    ids = _argmax(_rows(x, params, group))  # [G]
    return ids.float(), lambda h: [TokenResult(int(i)) for i in h.tolist()]


def _draw(x: torch.Tensor, params: torch.Tensor, group: _Group) -> tuple[torch.Tensor, Unpack]:
    """temperature -> softmax -> top-k -> top-p -> min-p -> renormalise -> inverse CDF.

    Each filter becomes a probability threshold, and a token survives if p >= the largest one:
    tokens tied at a cut-off are all kept, so the kept set never depends on sort order.
    """
    z = _rows(x, params, group)  # [S, V]
    temp, top_k, top_p, min_p, u = (params[:, c : c + 1] for c in range(1, 6))  # each [S, 1]
    probs = torch.softmax(z / temp.float(), dim=-1)  # [S, V]
    threshold = min_p.float() * probs.amax(-1, keepdim=True)  # [S, 1]
    if group.kind == "sample_sorted":
        specs = [s for s in group.specs if isinstance(s, Sample)]
        vocab = probs.shape[-1]
        # Every kept token lies among the max(top_k) most probable unless some row needs them all.
        width = (
            vocab if any(s.top_k == 0 for s in specs) else min(vocab, max(s.top_k for s in specs))
        )
        cut = _top_k_top_p_threshold(probs, top_k.long(), top_p.float(), width)
        threshold = torch.maximum(threshold, cut)
    kept = torch.where(probs >= threshold, probs, 0.0)  # [S, V], unnormalised
    cdf = kept.double().cumsum(-1)  # [S, V]
    total = cdf[:, -1:]  # [S, 1] > 0: the argmax always survives
    # u * total may round up to total; stay strictly below so the search lands on a kept token.
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    ids = torch.searchsorted(cdf, target, right=True).squeeze(1)  # [S]: first cdf > target
    return ids.float(), lambda h: [TokenResult(int(i)) for i in h.tolist()]


def _top_k_top_p_threshold(
    probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, width: int
) -> torch.Tensor:
    """Per row, the smallest probability top-k and top-p keep. probs [S, V]; returns [S, 1]."""
    if width < probs.shape[-1]:
        head = probs.topk(width, dim=-1).values  # [S, W] descending
    else:
        head = probs.sort(dim=-1, descending=True).values  # [S, V]
    k = torch.where(top_k > 0, top_k, width).clamp(max=width)  # [S, 1]
    k_cut = head.gather(-1, k - 1)  # [S, 1]
    # top-p measures mass within the top-k survivors (vLLM's order): keep the shortest prefix
    # reaching top_p of it, i.e. every token whose preceding mass is still below top_p.
    survivors = torch.where(head >= k_cut, head, 0.0)  # [S, W]
    cum = survivors.cumsum(-1)  # [S, W], non-decreasing
    before = torch.nn.functional.pad(cum[:, :-1], (1, 0))  # [S, W] mass strictly before each
    in_p = before < top_p * cum[:, -1:]  # [S, W], a prefix holding at least the first token
    p_cut = head.gather(-1, in_p.sum(-1, keepdim=True) - 1)  # [S, 1]
    p_cut = torch.where(top_p < 1.0, p_cut, 0.0)  # top_p == 1 keeps all, despite rounding
    return torch.maximum(k_cut, p_cut)


def _distribution(
    x: torch.Tensor, params: torch.Tensor, group: _Group
) -> tuple[torch.Tensor, Unpack]:
    z = _rows(x, params, group)  # [D, V]
    temp = params[:, 1:2].float()  # [D, 1]
    hot = temp >= MIN_TEMPERATURE
    # Temperature 0 is the limit of the softmax: all mass split evenly over the maximal logits.
    cold = torch.where(z == z.amax(-1, keepdim=True), 0.0, -math.inf)
    probs = torch.softmax(torch.where(hot, z / torch.where(hot, temp, 1.0), cold), dim=-1)
    ks = [s.k for s in group.specs if isinstance(s, TopKDistribution)]
    k_max = max(ks)
    # Ranking by logit equals ranking by probability, and still orders tokens whose
    # probability underflowed to 0.
    top_z, ids = z.topk(k_max, dim=-1)  # [D, K]
    out = torch.stack([ids.float(), probs.gather(-1, ids), (top_z > -math.inf).float()])

    def unpack(h: torch.Tensor) -> list[SampleResult]:
        id_rows, p_rows, ok_rows = h.view(3, len(ks), k_max).tolist()
        results: list[SampleResult] = []
        for k, ids_, ps, ok in zip(ks, id_rows, p_rows, ok_rows, strict=True):
            n = min(k, int(sum(ok)))  # a mask may allow fewer than k tokens
            results.append(DistributionResult([int(i) for i in ids_[:n]], ps[:n]))
        return results

    return out.reshape(-1), unpack


def _logprobs(x: torch.Tensor, params: torch.Tensor, group: _Group) -> tuple[torch.Tensor, Unpack]:
    lp = torch.log_softmax(_rows(x, params, group), dim=-1)  # [L, V]
    values = lp.gather(-1, params[:, 1:].long())  # [L, W], padded with id 0
    lengths = [len(s.token_ids) for s in group.specs if isinstance(s, LogProbs)]

    def unpack(h: torch.Tensor) -> list[SampleResult]:
        table = h.view(len(lengths), -1).tolist()
        return [LogProbsResult(r[:n]) for r, n in zip(table, lengths, strict=True)]

    return values.reshape(-1), unpack


def _entropy(x: torch.Tensor, params: torch.Tensor, group: _Group) -> tuple[torch.Tensor, Unpack]:
    lp = torch.log_softmax(_rows(x, params, group), dim=-1)  # [E, V]
    # 0 * log 0 = 0 for masked tokens (torch would give 0 * -inf = nan).
    plogp = torch.where(lp > -math.inf, lp.exp() * lp, 0.0)  # [E, V]
    return -plogp.sum(-1), lambda h: [EntropyResult(v) for v in h.tolist()]


def _raw(x: torch.Tensor, params: torch.Tensor, group: _Group) -> tuple[torch.Tensor, Unpack]:
    z = _rows(x, params, group)  # [R, V]
    vocab = z.shape[-1]
    # Clone each row so a result does not keep the whole batch's host buffer alive.
    return z.reshape(-1), lambda h: [LogitsResult(r.clone()) for r in h.view(-1, vocab)]


_KERNELS: dict[str, Callable[[torch.Tensor, torch.Tensor, _Group], tuple[torch.Tensor, Unpack]]] = {
    "greedy": _greedy,
    "sample": _draw,
    "sample_sorted": _draw,
    "distribution": _distribution,
    "logprobs": _logprobs,
    "entropy": _entropy,
    "raw": _raw,
}


# ---- validation (host, before any computation) ---------------------------------------------
def _validate(
    logits: torch.Tensor,
    specs: Sequence[SamplerSpec],
    masks: Sequence[np.ndarray | None] | None,
) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        got = (
            f"{logits.dtype} of shape {tuple(logits.shape)}"
            if isinstance(logits, torch.Tensor)
            else type(logits).__name__
        )
        raise InvalidBatchError(f"logits must be a 2-D float tensor [rows, vocab], got {got}")
    rows, vocab = logits.shape
    if not 0 < vocab <= _MAX_VOCAB:
        raise InvalidBatchError(f"vocabulary of {vocab} tokens is outside 1 .. {_MAX_VOCAB}")
    if len(specs) != rows:
        raise InvalidBatchError(
            f"{len(specs)} sampler specs for {rows} logit rows; give exactly one spec per row"
        )
    if masks is not None and len(masks) != rows:
        raise InvalidBatchError(
            f"{len(masks)} logit masks for {rows} logit rows; give one per row (None = no mask)"
        )
    for row, spec in enumerate(specs):
        _check_spec(row, spec, vocab)
    for row, mask in enumerate(masks or ()):
        if mask is not None:
            _check_mask(row, mask, vocab)


def validate_spec(spec: object, vocab: int) -> None:
    """Raise InvalidBatchError if `spec` cannot be applied to a [vocab] logit row."""
    _check_spec(0, spec, vocab)


# A tuple, not `Greedy | RawLogits | Entropy`: that builds a union object on every call, which
# made this check the costliest line of admitting a decode step.
_NO_PARAMETERS = (Greedy, RawLogits, Entropy)


def _check_spec(row: int, spec: object, vocab: int) -> None:
    if isinstance(spec, _NO_PARAMETERS):
        return
    if isinstance(spec, Sample):
        _check_temperature(row, spec.temperature)
        if not _is_int(spec.top_k) or spec.top_k < 0:
            raise InvalidBatchError(
                f"row {row}: top_k {spec.top_k!r} must be an int >= 0 (0 disables it)"
            )
        if not _is_real(spec.top_p) or not 0.0 < spec.top_p <= 1.0:
            raise InvalidBatchError(
                f"row {row}: top_p {spec.top_p!r} must be in (0, 1] (1 disables it)"
            )
        if not _is_real(spec.min_p) or not 0.0 <= spec.min_p < 1.0:
            raise InvalidBatchError(
                f"row {row}: min_p {spec.min_p!r} must be in [0, 1) (0 disables it)"
            )
        lo, hi = _SEED_RANGE
        if spec.seed is not None and (not _is_int(spec.seed) or not lo <= spec.seed <= hi):
            raise InvalidBatchError(
                f"row {row}: seed {spec.seed!r} must be None or an int in [-2**63, 2**64)"
            )
        return
    if isinstance(spec, TopKDistribution):
        _check_temperature(row, spec.temperature)
        if not _is_int(spec.k) or not 0 < spec.k <= vocab:
            raise InvalidBatchError(
                f"row {row}: distribution k {spec.k!r} must be in 1 .. {vocab} (the vocabulary size)"
            )
        return
    if isinstance(spec, LogProbs):
        for t in spec.token_ids:
            if not _is_int(t) or not 0 <= t < vocab:
                raise InvalidBatchError(
                    f"row {row}: logprob token id {t!r} is outside 0 .. {vocab - 1}"
                )
        return
    raise InvalidBatchError(
        f"row {row}: unknown sampler {type(spec).__name__}; use Greedy, Sample, TopKDistribution, "
        "RawLogits, LogProbs or Entropy from pie.engine.request"
    )


def _check_temperature(row: int, temperature: object) -> None:
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:  # type: ignore[arg-type, operator]
        raise InvalidBatchError(
            f"row {row}: temperature {temperature!r} must be finite and >= 0 (0 = greedy)"
        )


def _check_mask(row: int, mask: object, vocab: int) -> None:
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_ or mask.shape != (vocab,):
        got = f"{mask.dtype} {mask.shape}" if isinstance(mask, np.ndarray) else type(mask).__name__
        raise InvalidBatchError(
            f"row {row}: logit mask must be a bool array of shape ({vocab},), got {got}"
        )
    if not mask.any():
        raise InvalidBatchError(
            f"row {row}: logit mask allows no token; allow at least one (True = allowed)"
        )


def _is_int(v: object) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)
