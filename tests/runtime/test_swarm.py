"""agent_swarm: role agents as child instances passing work over the message bus; tools called
from inside the server; a failing or refused tool is an error the swarm reports, never a hang.

Every run is sandboxed and native with the same result. The fake engine checks the control flow
exactly (it never writes an action, so each researcher uses all its turns); the real SmolLM2
reaches the answers of two fixed tasks through the tool server of `bench.agentic`.
"""

from __future__ import annotations

import runpy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.agentic.tool_server import ToolServer
from pie.runtime.limits import InstanceLimits
from pie.runtime.runtime import Runtime
from tests.runtime.conftest import ROOT, assert_pool_whole, make_runtime, run_both
from tests.runtime.fakes import FakeEngine

pytestmark = pytest.mark.slow  # builds a component

SWARM = ROOT / "inferlets" / "agent_swarm.py"
AGENT = runpy.run_path(str(SWARM), run_name="agent")


def _register(rt: Runtime) -> None:
    rt.add_source(SWARM, name="swarm")
    rt.add_source(SWARM, name="swarm-native", native=True)


def run_swarm(rt: Runtime, args: list[str], **kwargs: Any) -> dict[str, Any]:
    return dict(run_both(rt, "swarm", args, **kwargs))


@pytest.fixture(scope="module")
def tools() -> Iterator[ToolServer]:
    with ToolServer() as server:
        yield server


# ---- the fake engine: exact control flow ---------------------------------------------------------
@pytest.fixture(scope="module")
def fake() -> FakeEngine:
    return FakeEngine(num_pages=1024, page_size=4)


@pytest.fixture(scope="module")
def fake_rt(fake: FakeEngine, pie_cache: Path) -> Iterator[Runtime]:
    with make_runtime(fake, pie_cache, workers=0) as rt:
        _register(rt)
        yield rt
        assert not rt.instances()
        assert_pool_whole(rt)


def test_researchers_work_side_by_side_and_the_writer_gets_every_note_in_order(
    fake_rt: Runtime, fake: FakeEngine, tools: ToolServer
) -> None:
    questions = ["Q one?", "Q two?", "Q three?"]
    fake.batches.clear()
    out = run_swarm(fake_rt, [tools.url, "2", "c1", *questions])
    # The fake writes bytes, never an action: each researcher takes every turn it may, reading
    # the format error each time, and calls no tool.
    steps = AGENT["RESEARCH_STEPS"]
    assert out["notes"] == ["Note: no answer found."] * 3
    assert (out["ios"], out["steps"], out["tool_errors"]) == (0, 3 * steps + 1, 3 * steps)
    assert sum(tools.calls.values()) == 0
    # two researchers, each in its own instance and context, decoded in the same engine steps
    assert max(len(b.sequences) for b in fake.batches) == 2


def test_the_parser_takes_the_first_action_or_note() -> None:
    parse = AGENT["parse_turn"]
    assert parse("Action: lookup[Zorbia]\nNote: x") == ("action", "lookup", "Zorbia")
    assert parse("Note: The capital is Quellen.\nAction: lookup[x]")[:1] == ("note",)
    assert parse("I think so.")[0] == "none"
    assert AGENT["observation"](500, '{"error": "internal error"}').startswith("error: ")
    assert AGENT["observation"](200, "\x00 not json").startswith("error: ")


# ---- the real model: answers, and tools that fail ------------------------------------------------
@pytest.fixture(scope="module")
def real_rt(pie_cache: Path) -> Iterator[Runtime]:
    pytest.importorskip("pie.engine.tokenizer")
    import torch

    from pie.engine.engine import Engine

    engine = Engine.load(None, dtype=torch.float32, num_pages=512)
    with make_runtime(engine, pie_cache, workers=0) as rt:
        _register(rt)
        yield rt
        assert not rt.instances()
        assert_pool_whole(rt)


@pytest.mark.parametrize(
    ("questions", "facts"),
    [
        (["What is the capital of Zorbia?"], ["Quellen"]),
        (["What is the capital of Marovia?", "When was Tessel founded?"], ["Tessel", "1504"]),
    ],
)
def test_the_swarm_looks_up_and_answers_on_the_real_model(
    real_rt: Runtime, tools: ToolServer, questions: list[str], facts: list[str]
) -> None:
    out = run_swarm(real_rt, [tools.url, "2", "c1", *questions])
    assert out["ios"] == len(questions) and out["tool_errors"] == 0
    assert out["steps"] == 2 * len(questions) + 1  # an action and a note each, then the writer
    for fact in facts:
        assert fact in out["answer"]


@pytest.mark.parametrize("fault", ["500", "garbage"])
def test_a_failing_tool_is_an_error_the_swarm_reports(real_rt: Runtime, fault: str) -> None:
    with ToolServer(fault=fault) as broken:
        out = run_swarm(real_rt, [broken.url, "1", "c1", "What is the capital of Zorbia?"])
        assert broken.calls["/lookup"] >= 2  # once per mode at least
    assert out["ios"] >= 1 and out["tool_errors"] >= 1
    assert len(out["notes"]) == 1 and out["answer"]


def test_a_disallowed_host_is_refused_and_reported(real_rt: Runtime) -> None:
    limits = InstanceLimits(http_hosts=("tools.example",))  # the children inherit it
    with ToolServer() as unreachable:
        args = [unreachable.url, "1", "c1", "What is the capital of Zorbia?"]
        out = run_swarm(real_rt, args, limits=limits)
        assert sum(unreachable.calls.values()) == 0
    assert out["ios"] >= 1 and out["tool_errors"] == out["ios"]
