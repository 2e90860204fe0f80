"""The generation-strategy inferlets: each does what its docstring claims, sandboxed and natively.

Each inferlet is built once per session and run in both modes on the same small inputs: on the
fake engine (exact token checks against `reference_generation`, the recorded batches and the page
pool) and on the real SmolLM2 engine where a claim needs a real model (fewer forwards).
"""

from __future__ import annotations

import math
import runpy
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from pie.runtime.limits import InstanceLimits
from pie.runtime.runtime import Runtime
from tests.runtime.conftest import ROOT, assert_pool_whole, make_runtime, run_both
from tests.runtime.fakes import OFFSET, FakeEngine, next_token, reference_generation

pytestmark = pytest.mark.slow  # builds components

INFERLETS = ROOT / "inferlets"
STRATEGIES = [
    "speculative_ngram",
    "attention_sink",
    "windowed_attention",
    "best_of_n",
    "self_consistency",
    "prefix_tree",
    "self_correct",
    "tree_of_thought",
    "beam_search",
]


def _tokens(text: str) -> list[int]:
    return [b + OFFSET for b in text.encode()]


def _text(tokens: list[int]) -> str:
    return bytes(t - OFFSET for t in tokens).decode()


def _chat(user: str, system: str | None = None) -> list[int]:
    head = "" if system is None else f"[system]{system}\n"
    return _tokens(f"{head}[user]{user}\n[assistant]")


def _ran(fake: FakeEngine) -> int:
    """Tokens the fake engine has run since the test began."""
    return sum(len(s.tokens) for b in fake.batches for s in b.sequences)


@pytest.fixture(scope="module")
def fake() -> FakeEngine:
    return FakeEngine(num_pages=512, page_size=4)


def _register(rt: Runtime) -> None:
    """Every strategy, sandboxed and native; two builds at a time (each is one process)."""
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda n: rt.add_source(INFERLETS / f"{n}.py", name=n), STRATEGIES))
    for name in STRATEGIES:
        rt.add_source(INFERLETS / f"{name}.py", name=f"{name}-native", native=True)


@pytest.fixture(scope="module")
def fake_rt(fake: FakeEngine, pie_cache: Path) -> Iterator[Runtime]:
    with make_runtime(fake, pie_cache, workers=0) as rt:
        _register(rt)
        yield rt


@pytest.fixture
def rt(fake_rt: Runtime, fake: FakeEngine) -> Iterator[Runtime]:
    fake.batches.clear()
    yield fake_rt
    assert not fake_rt.instances()
    assert_pool_whole(fake_rt)


# ---- speculative_ngram ---------------------------------------------------------------------------
def test_speculative_ngram_equals_greedy_on_the_fake(rt: Runtime) -> None:
    out = run_both(rt, "speculative_ngram", ["40", "abcabcabc"])
    assert out["tokens"] == reference_generation(_chat("abcabcabc"), 40)
    assert out["equal_to_greedy"] and out["greedy_forwards"] == 40
    assert out["forwards"] <= 40


# ---- attention_sink, windowed_attention ----------------------------------------------------------
def _window_reference(prompt: list[int], n: int, sink: int, window: int) -> list[int]:
    """The fake's greedy text when each token sees the first `sink` and the last `window`."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(next_token(seq[:sink] + seq[max(sink, len(seq) - window) :]))
    return seq[len(prompt) :]


@pytest.mark.parametrize(("name", "sink"), [("attention_sink", 4), ("windowed_attention", 0)])
def test_windows_generate_four_times_the_budget_in_bounded_pages(
    rt: Runtime, fake: FakeEngine, name: str, sink: int
) -> None:
    pages, budget = 8, 8 * fake.page_size
    n = 4 * budget
    limits = InstanceLimits(kv_pages=pages)  # one page more and the forward would fail
    out = run_both(rt, name, [str(n), str(pages), "Hi"], limits=limits)
    assert out["tokens"] == _window_reference(_chat("Hi"), n, sink, budget // 2)
    assert out["most_pages"] == pages and out["rebuilds"] >= 4
    assert max(s.context_len + len(s.tokens) for b in fake.batches for s in b.sequences) <= budget


# ---- best_of_n, self_consistency -------------------------------------------------------------------
def test_best_of_n_scores_each_answer_by_its_mean_logprob(rt: Runtime, fake: FakeEngine) -> None:
    # The fake always "samples" its greedy token, which it gives log-probability -1 (others -5).
    out = run_both(rt, "best_of_n", ["3", "Hi"])
    answer = _text(reference_generation(_chat("Hi"), 48))
    assert out["texts"] == [answer] * 3 and out["scores"] == [-1.0] * 3
    assert out["best"] == 0 and out["text"] == answer
    # per run: the prompt once, three answers, and three one-forward rescorings of 48 tokens
    assert _ran(fake) == 2 * (len(_chat("Hi")) - 1 + 3 * 48 + 3 * 48)


def test_self_consistency_votes_on_the_final_answers(rt: Runtime) -> None:
    out = run_both(rt, "self_consistency", ["5", "Hi"])
    path = _text(reference_generation(_chat("Hi", "Think step by step, then give the answer."), 64))
    assert out["paths"] == [path] * 5
    assert out["answer"] == path.split()[-1] and out["votes"] == {out["answer"]: 5}


# ---- prefix_tree ---------------------------------------------------------------------------------
def test_prefix_tree_runs_each_node_once_and_shares_its_pages(
    rt: Runtime, fake: FakeEngine
) -> None:
    tree = runpy.run_path(str(INFERLETS / "prefix_tree.py"))
    system, levels = tree["SYSTEM"], tree["LEVELS"]
    paths = [a + b + c for a in levels[0] for b in levels[1] for c in levels[2]]
    # The 8 leaves hold 364 pages between them; shared, the whole tree fits in 200 (the quota:
    # one page more and a forward fails). Measured: 190 is too few (partial pages are copied).
    out = run_both(rt, "prefix_tree", ["Hi"], limits=InstanceLimits(kv_pages=200))
    assert out["leaf_pages"] == 364
    for leaf, path in zip(out["leaves"], paths, strict=True):
        prompt = _chat("Hi" + path, system)
        assert leaf == {"path": path.strip(), "answer": _text(reference_generation(prompt, 32))}
    nodes = len(_tokens(f"[system]{system}\n[user]Hi")) + sum(
        len(_tokens(piece)) * 2**depth for depth, pieces in enumerate(levels) for piece in pieces
    )
    # every node once; the 7 inner nodes' last tokens once more (in their second child)
    assert _ran(fake) == 2 * (nodes + 8 * len(_tokens("\n[assistant]")) + 7 + 8 * 31)


# ---- self_correct --------------------------------------------------------------------------------
def test_self_correct_rewinds_to_each_failure_and_never_reruns_the_prompt(
    rt: Runtime, fake: FakeEngine
) -> None:
    # The fake writes letters, never JSON: each try fails at the token after the last banned one
    # (a banned letter becomes <pad>, which decodes to nothing).
    out = run_both(rt, "self_correct", ["Hi"])
    assert out["value"] is None and out["rewinds"] == list(range(8))
    system = 'Reply with one JSON object only, such as {"name": "Bo"}.'
    start = len(_chat("Hi", system)) - 1
    sequences = [s for b in fake.batches for s in b.sequences]
    assert [s.context_len for s in sequences if s.context_len == 0] == [0, 0]  # once per run
    tries = [s.context_len for s in sequences if s.logit_mask is not None]
    assert tries == 2 * [start + at for at in [0, *out["rewinds"][:-1]]]


# ---- tree_of_thought -----------------------------------------------------------------------------
def test_tree_of_thought_branches_batch_and_copy_only_partial_pages(
    rt: Runtime, fake: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    copies: list[tuple[int, int, int]] = []
    copy_pages = fake.copy_pages
    monkeypatch.setattr(fake, "copy_pages", lambda pairs: (copies.extend(pairs), copy_pages(pairs)))
    out = run_both(rt, "tree_of_thought", ["Hi"])
    assert len(copies) == 2 * out["pages_copied"] and out["pages_copied"] > 0  # both runs
    assert out["pages_shared"] > out["pages_copied"]
    widths = [len(b.sequences) for b in fake.batches]
    assert widths.count(3) >= 2 * 2 * 24  # the branches' decode steps ran three wide
    assert len(out["levels"]) == 2 and all(len(level) == 3 for level in out["levels"])


@pytest.fixture(scope="module")
def real_rt(pie_cache: Path) -> Iterator[Runtime]:
    pytest.importorskip("pie.engine.tokenizer")
    import torch

    from pie.engine.engine import Engine

    engine = Engine.load(None, dtype=torch.float32, num_pages=256)  # float32, as HF's reference
    with make_runtime(engine, pie_cache, workers=0) as rt:
        _register(rt)
        yield rt
        assert_pool_whole(rt)


def test_speculative_ngram_needs_fewer_forwards_on_the_real_model(real_rt: Runtime) -> None:
    out = run_both(real_rt, "speculative_ngram", ["64", "Count from 1 to 30, separated by commas."])
    assert out["equal_to_greedy"] and len(out["tokens"]) == out["greedy_forwards"] == 64
    assert out["forwards"] < 0.9 * out["greedy_forwards"]


def test_best_of_n_and_self_consistency_pick_from_distinct_samples(real_rt: Runtime) -> None:
    best = run_both(real_rt, "best_of_n", ["3", "Give a one-line definition of entropy."])
    assert len(set(best["texts"])) == 3  # the seeds differ, so do the samples
    assert best["scores"][best["best"]] == max(best["scores"]) and best["text"] in best["texts"]
    vote = run_both(real_rt, "self_consistency", ["3", "What is 2 + 2?"])
    assert sum(vote["votes"].values()) == 3
    assert vote["votes"][vote["answer"]] == max(vote["votes"].values())


def test_self_correct_gets_valid_json_from_the_real_model(real_rt: Runtime) -> None:
    out = run_both(real_rt, "self_correct", [])
    assert out["value"] == {"name": "Bo", "age": 10} and out["rewinds"] == [0]


# ---- beam_search ---------------------------------------------------------------------------------
def _reference_beams(model: Any, prompt: list[int], width: int, steps: int, stops: Any) -> list:
    """The same beam search on HF transformers' logits (no KV cache: each beam re-run whole)."""
    import torch

    live: list[tuple[float, list[int]]] = [(0.0, [])]
    done: list[tuple[float, list[int]]] = []
    for _ in range(steps):
        candidates = []
        for i, (logprob, tokens) in enumerate(live):
            with torch.no_grad():
                logits = model(torch.tensor([prompt + tokens])).logits[0, -1]
            top = torch.topk(torch.log_softmax(logits.double(), -1), width)
            candidates += [
                (logprob + float(v), i, [*tokens, int(t)])
                for v, t in zip(top.values, top.indices, strict=True)
            ]
        candidates.sort(key=lambda c: -c[0])
        live = []
        for logprob, _, tokens in candidates[:width]:
            (done if tokens[-1] in stops else live).append((logprob, tokens))
        if not live:
            break
    done += live
    return sorted(done, key=lambda b: -b[0] / len(b[1]))  # length penalty, ALPHA = 1


def test_beam_search_equals_a_reference_on_hf_logits(real_rt: Runtime) -> None:
    transformers = pytest.importorskip("transformers")
    import torch

    from pie.engine.loader import default_model_path

    width, steps, prompt = 3, 10, "The capital of France is"
    beams = run_both(real_rt, "beam_search", [str(width), str(steps), prompt])
    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    tokenizer = real_rt.engine.tokenizer  # type: ignore[attr-defined]
    reference = _reference_beams(
        model, tokenizer.encode(prompt), width, steps, tokenizer.stop_token_ids
    )
    assert [b["tokens"] for b in beams] == [tokens for _, tokens in reference]
    for beam, (logprob, tokens) in zip(beams, reference, strict=True):
        assert math.isclose(beam["logprob"], logprob, abs_tol=1e-3)
        assert math.isclose(beam["score"], logprob / len(tokens), abs_tol=1e-3)
