"""Four more strategy inferlets: skeleton, graph and recursion of thought, and a watermark.

Each is built once per module and run sandboxed and natively on the same input (the outputs
must be equal). On the fake engine the texts are checked token for token against a reference
built from `next_token` over exactly the tokens each context should hold, the page copies
against the pages the fake actually copied, and the batching against the recorded batches; the
watermark is also run on the real SmolLM2, where the z-score must tell marked from unmarked.
"""

from __future__ import annotations

import runpy
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from pie.runtime.runtime import Runtime
from tests.runtime.conftest import ROOT, assert_pool_whole, make_runtime, run_both
from tests.runtime.fakes import OFFSET, FakeEngine, reference_generation

pytestmark = pytest.mark.slow  # builds components

INFERLETS = ROOT / "inferlets"
STRATEGIES = ["skeleton_of_thought", "graph_of_thought", "recursion_of_thought", "watermark"]


def _tokens(text: str) -> list[int]:
    return [b + OFFSET for b in text.encode()]


def _text(tokens: list[int]) -> str:
    return bytes(t - OFFSET for t in tokens).decode()


def _chat(user: str, system: str) -> list[int]:
    return _tokens(f"[system]{system}\n[user]{user}\n[assistant]")


def _constants(name: str) -> dict[str, Any]:
    return runpy.run_path(str(INFERLETS / f"{name}.py"))


@pytest.fixture(scope="module")
def fake() -> FakeEngine:
    return FakeEngine(num_pages=512, page_size=4)


def _register(rt: Runtime) -> None:
    """Every inferlet, sandboxed and native; two builds at a time (each is one process)."""
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
def rt(
    fake_rt: Runtime, fake: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Runtime, list]]:
    """The fake runtime, with a record of every page copy the fake engine makes."""
    fake.batches.clear()
    copies: list[tuple[int, int, int]] = []
    copy_pages = fake.copy_pages

    def record(pairs: list[tuple[int, int, int]]) -> None:
        copies.extend(pairs)
        copy_pages(pairs)

    monkeypatch.setattr(fake, "copy_pages", record)
    yield fake_rt, copies
    assert not fake_rt.instances()
    assert_pool_whole(fake_rt)


def _widths(fake: FakeEngine) -> list[int]:
    return [len(b.sequences) for b in fake.batches]


def _prefills(fake: FakeEngine) -> int:
    """Forwards that started a context from slot 0 (a prompt run from scratch)."""
    return sum(s.context_len == 0 for b in fake.batches for s in b.sequences)


# ---- skeleton_of_thought -------------------------------------------------------------------------
def test_skeleton_expands_every_point_in_one_batch_on_shared_pages(
    rt: tuple[Runtime, list], fake: FakeEngine
) -> None:
    runtime, copies = rt
    sot = _constants("skeleton_of_thought")
    out = run_both(runtime, "skeleton_of_thought", ["Hi"])
    seq, points = _chat("Hi", sot["SYSTEM"]) + _tokens("Skeleton:"), []
    for number in range(1, sot["POINTS"] + 1):  # the fake never ends a line: 12 tokens a point
        seq += _tokens(f"\n{number}.")
        written = reference_generation(seq, sot["POINT_TOKENS"])
        seq += written
        points.append(_text(written))
    seq += _tokens("\n")
    assert out["points"] == points
    for number, (point, expansion) in enumerate(
        zip(points, out["expansions"], strict=True), start=1
    ):
        branch = seq + _tokens(f"\nPoint {number} ({point}) in one or two sentences:")
        assert expansion == _text(reference_generation(branch, sot["EXPAND_TOKENS"]))
    # the forks share the skeleton's full pages and each copies its partial last one
    assert out["pages_shared"] == sot["POINTS"] * ((len(seq) - 1) // fake.page_size)
    assert out["pages_copied"] == sot["POINTS"] and len(copies) == 2 * sot["POINTS"]
    assert _widths(fake).count(sot["POINTS"]) == 2 * sot["EXPAND_TOKENS"]  # side by side
    assert _prefills(fake) == 2  # the question ran once per run


# ---- graph_of_thought ----------------------------------------------------------------------------
def test_graph_merges_the_branches_on_the_prompts_pages_and_refines(
    rt: tuple[Runtime, list], fake: FakeEngine
) -> None:
    runtime, copies = rt
    got = _constants("graph_of_thought")
    out = run_both(runtime, "graph_of_thought", ["Hi"])
    prompt = _chat("Hi", "Think of ideas, then combine the best of them.")
    idea = _text(reference_generation(prompt, got["IDEA_TOKENS"]))  # the fake ignores seeds
    assert out["ideas"] == [idea] * got["BRANCHES"]
    listed = "".join(f"\n{n}. {idea}" for n in range(1, got["BRANCHES"] + 1))
    node = prompt + _tokens(f"Ideas:{listed}\n\nCombined:\n\n")
    merged = reference_generation(node, got["MERGE_TOKENS"])
    assert out["aggregate"] == _text(merged)
    node += merged + _tokens("\n\nImproved:\n\n")
    assert out["refined"] == _text(reference_generation(node, got["MERGE_TOKENS"]))
    assert out["pages_copied"] > 0 and len(copies) == 2 * out["pages_copied"]
    assert out["pages_shared"] > 4 * out["pages_copied"]
    assert _widths(fake).count(got["BRANCHES"]) == 2 * got["IDEA_TOKENS"]  # ideas side by side
    assert _prefills(fake) == 2  # the aggregate forked the prompt: it did not run it again


# ---- recursion_of_thought ------------------------------------------------------------------------
def _rot_reference(
    seq: list[int], depth: int, rot: dict[str, Any], lengths: list[int]
) -> dict[str, Any]:
    """The tree the inferlet must return, from `next_token` over what each context holds;
    `lengths` gets each context's length after each of its lines."""

    def line(prefix: str, n: int) -> str:
        nonlocal seq
        out = reference_generation(seq + _tokens(prefix), n)  # the fake never ends a line
        seq = seq + _tokens(prefix) + out + _tokens("\n")
        lengths.append(len(seq))
        return _text(out)

    if depth == rot["DEPTH"]:
        return {"answer": line("Answer:", rot["ANSWER_TOKENS"])}
    problems = [line(f"Sub-problem {n}:", rot["LINE_TOKENS"]) for n in range(1, rot["SPLIT"] + 1)]
    solved = [
        _rot_reference(seq + _tokens(f"Solving sub-problem {n}.\n"), depth + 1, rot, lengths)
        for n in range(1, rot["SPLIT"] + 1)
    ]
    for n, part in enumerate(solved, start=1):  # only the answers, never the children's work
        seq = seq + _tokens(f"Answer to sub-problem {n}: {part['answer']}\n")
    answer = line("So the answer is:", rot["ANSWER_TOKENS"])
    parts = [{"problem": p, **s} for p, s in zip(problems, solved, strict=True)]
    return {"subproblems": parts, "answer": answer}


def test_recursion_solves_subproblems_in_forks_and_returns_only_answers(
    rt: tuple[Runtime, list], fake: FakeEngine
) -> None:
    runtime, copies = rt
    rot = _constants("recursion_of_thought")
    out = run_both(runtime, "recursion_of_thought", ["Hi"])
    lengths: list[int] = []
    tree = {k: out[k] for k in ("subproblems", "answer")}
    assert tree == _rot_reference(_chat("Hi", rot["SYSTEM"]), 0, rot, lengths)
    assert out["longest_context"] == max(lengths)
    assert out["pages_copied"] > 0 and len(copies) == 2 * out["pages_copied"]
    leaves = rot["SPLIT"] ** rot["DEPTH"]
    assert _widths(fake).count(leaves) == 2 * rot["ANSWER_TOKENS"]  # the leaves side by side
    assert _prefills(fake) == 2


# ---- watermark -----------------------------------------------------------------------------------
def test_watermark_is_found_in_marked_text_and_not_in_unmarked(
    rt: tuple[Runtime, list], fake: FakeEngine
) -> None:
    # The fake's TopK(4) is four consecutive ids at 1/4 each: a fair draw unless DELTA tilts it
    runtime, _ = rt
    out = run_both(runtime, "watermark", ["mark", "64", "4", "Hi"])
    assert len(out["marked"]) == len(out["unmarked"]) == 64  # one byte a token
    assert out["z_marked"] > 4 and abs(out["z_unmarked"]) < 2
    assert _widths(fake).count(2) == 2 * 64  # marked and unmarked decode side by side
    for key in ("marked", "unmarked"):  # the detector needs nothing but the text
        found = run_both(runtime, "watermark", ["detect", out[key]])
        assert found == {"tokens": 64, "z": out[f"z_{key}"]}


@pytest.fixture(scope="module")
def real_rt(pie_cache: Path) -> Iterator[Runtime]:
    pytest.importorskip("pie.engine.tokenizer")
    import torch

    from pie.engine.engine import Engine

    engine = Engine.load(None, dtype=torch.float32, num_pages=128)
    with make_runtime(engine, pie_cache, workers=0) as rt:
        for name in ("watermark",):
            rt.add_source(INFERLETS / f"{name}.py", name=name)
            rt.add_source(INFERLETS / f"{name}.py", name=f"{name}-native", native=True)
        yield rt
        assert_pool_whole(rt)


def test_watermark_z_score_tells_marked_from_unmarked_on_the_real_model(real_rt: Runtime) -> None:
    # Measured: z 5.6 marked, -0.8 unmarked (64 tokens, top 40, GAMMA 0.25, DELTA 2)
    out = run_both(real_rt, "watermark", ["mark", "64", "40", "Write a short story about the sea."])
    assert out["z_marked"] > 4 and abs(out["z_unmarked"]) < 2
    assert out["marked"] != out["unmarked"]
