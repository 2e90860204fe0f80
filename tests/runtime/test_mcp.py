"""MCP tools from inferlets: granted servers only, their tools listed and called asynchronously
(streamable HTTP and stdio), and every failure of a server an error the program handles, never
a hung instance. Sandboxed and native runs must give the same output."""

from __future__ import annotations

import dataclasses
import json
import runpy
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.agentic.mcp_server import BrokenServer, HttpMcpServer
from pie.runtime.host.mcp import close_all, grant
from pie.runtime.limits import InstanceLimits
from pie.runtime.runtime import Runtime
from pie.server.config import ConfigError, ServerConfig
from tests.runtime.conftest import ROOT, assert_pool_whole, make_runtime, run_both
from tests.runtime.fakes import OFFSET, FakeEngine, reference_generation

pytestmark = pytest.mark.slow  # builds components

TOOL_DOCS = ROOT / "inferlets" / "tool_docs_pruning.py"
PAGE = 16  # the fake engine's page size here

# The probe: one MCP operation per launch, its outcome (or error) as JSON.
PROBE = """
import asyncio, json, time
from pie.sdk import PieError, mcp

async def main(args):
    op, server = args[0], args[1] if len(args) > 1 else ""
    try:
        if op == "servers":
            return json.dumps(mcp.servers())
        if op == "tools":
            return json.dumps([[t.name, t.signature()] for t in await mcp.tools(server)])
        if op == "call":
            timeout = float(args[4]) if len(args) > 4 else None
            got = await mcp.call_tool(server, args[2], json.loads(args[3]), timeout=timeout)
            return json.dumps({"text": got.text, "data": got.data})
        if op == "gather":  # n slow calls together
            began = time.monotonic()
            calls = [mcp.call_tool(server, "hang", {"seconds": 0.4}) for _ in range(int(args[2]))]
            texts = [r.text for r in await asyncio.gather(*calls)]
            return json.dumps({"texts": texts, "overlapped": time.monotonic() - began < 1.0})
    except PieError as e:
        return json.dumps({"error": str(e)})
"""


def _closed_port_url() -> str:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/mcp"


@pytest.fixture(scope="module")
def desk() -> Iterator[HttpMcpServer]:
    with HttpMcpServer() as server:
        yield server
        close_all()  # the native instances' sessions (this process's), before the server goes


@pytest.fixture(scope="module")
def limits(desk: HttpMcpServer) -> Iterator[InstanceLimits]:
    broken = BrokenServer()
    stdio = f"{sys.executable} {ROOT / 'bench' / 'agentic' / 'mcp_server.py'}"
    yield InstanceLimits(
        cpu_seconds=60.0,  # the guest's own time: a busy machine stretches it
        wall_seconds=300.0,
        mcp_timeout_s=20.0,  # a stdio server starts in a second or three on a busy machine
        mcp_servers=(
            ("desk", desk.url),
            ("desk-stdio", stdio),
            ("down", _closed_port_url()),
            ("five-hundred", broken.url("/500")),
            ("garbage", broken.url("/garbage")),
            ("hung", broken.url("/hang")),
        ),
    )
    broken.shutdown()


@pytest.fixture(scope="module")
def fake() -> FakeEngine:
    engine = FakeEngine(num_pages=1024, page_size=PAGE)
    engine.max_position = 16384  # the tool docs are ~8k bytes: ~8k tokens of the byte tokenizer
    return engine


@pytest.fixture(scope="module")
def rt(
    fake: FakeEngine, pie_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Runtime]:
    source = tmp_path_factory.mktemp("mcp") / "mcp_probe.py"
    source.write_text(PROBE)
    with make_runtime(fake, pie_cache) as runtime:  # worker processes hold the sessions
        runtime.add_source(source, name="probe")
        runtime.add_source(TOOL_DOCS, name="tool_docs")
        runtime.add_source(source, name="probe-native", native=True)
        runtime.add_source(TOOL_DOCS, name="tool_docs-native", native=True)
        yield runtime
        assert_pool_whole(runtime)


def run_probe(rt: Runtime, args: list[str], limits: InstanceLimits) -> Any:
    return run_both(rt, "probe", args, limits=limits)


def test_an_inferlet_lists_and_calls_the_tools_of_its_servers(
    rt: Runtime, limits: InstanceLimits
) -> None:
    names = ["desk", "desk-stdio", "down", "five-hundred", "garbage", "hung"]
    assert run_probe(rt, ["servers"], limits) == names
    for server in ("desk", "desk-stdio"):  # streamable HTTP, and a stdio subprocess
        tools = dict(run_probe(rt, ["tools", server], limits))
        assert tools["add"] == "add(a: number, b: number)"
        assert tools["search_flights"].startswith("search_flights(origin: string")
        assert run_probe(rt, ["call", server, "add", '{"a": 1.5, "b": 2}'], limits) == {
            "text": "3.5",
            "data": {"result": 3.5},
        }
    city = run_probe(rt, ["call", "desk", "lookup_city", '{"city": "lima"}'], limits)
    assert city["data"] == {"city": "Lima", "country": "Peru", "population": 10092000,
                            "timezone": "America/Lima"}  # fmt: skip


def test_a_failing_tool_is_an_error_the_program_reads(rt: Runtime, limits: InstanceLimits) -> None:
    failed = run_probe(rt, ["call", "desk", "fail", '{"reason": "out of seats"}'], limits)
    assert failed["error"].startswith("tool 'fail' of MCP server 'desk' failed: ")
    assert failed["error"].endswith("out of seats")  # the tool's own message reaches it
    unknown = run_probe(rt, ["call", "desk", "lookup_city", '{"city": "Atlantis"}'], limits)
    assert "no city named 'Atlantis'" in unknown["error"]
    bad_args = run_probe(rt, ["call", "desk", "add", '{"a": "x"}'], limits)
    assert "tool 'add' of MCP server 'desk' failed" in bad_args["error"]


def test_a_hung_tool_times_out_and_the_session_goes_on(rt: Runtime, limits: InstanceLimits) -> None:
    began = time.monotonic()
    hung = run_probe(rt, ["call", "desk", "hang", '{"seconds": 30}', "0.3"], limits)
    assert hung == {"error": "MCP server 'desk' did not answer within 0.3 s"}
    assert time.monotonic() - began < 5  # two runs of 0.3 s, not 30
    assert run_probe(rt, ["call", "desk", "add", '{"a": 1, "b": 1}'], limits)["text"] == "2.0"


def test_servers_that_fail_give_errors_never_a_hung_instance(
    rt: Runtime, limits: InstanceLimits
) -> None:
    began = time.monotonic()
    for server, seen in (
        ("down", "ConnectError"),
        ("five-hundred", "MCP server 'five-hundred'"),
        ("garbage", "MCP server 'garbage'"),
        ("hung", "did not answer within 1 s"),
    ):
        got = run_probe(rt, ["call", server, "add", '{"a": 1, "b": 2}', "1"], limits)
        assert seen in got["error"], (server, got)
    assert time.monotonic() - began < 20


def test_servers_not_granted_are_refused(rt: Runtime, limits: InstanceLimits) -> None:
    refused = run_probe(rt, ["tools", "elsewhere"], limits)["error"]
    assert "MCP server 'elsewhere' is not granted to this instance" in refused
    assert "mcp_servers" in refused
    narrowed = dataclasses.replace(limits, mcp_servers=limits.mcp_servers[2:])  # no desk
    assert "is not granted" in run_probe(rt, ["call", "desk", "add", "{}"], narrowed)["error"]
    nothing = InstanceLimits()  # the default grants no server at all
    assert run_probe(rt, ["servers"], nothing) == []
    assert "(it may use no server)" in run_probe(rt, ["tools", "desk"], nothing)["error"]


def test_calls_run_concurrently_up_to_the_cap(rt: Runtime, limits: InstanceLimits) -> None:
    assert run_probe(rt, ["gather", "desk", "3"], limits) == {
        "texts": ["woke"] * 3,
        "overlapped": True,  # three 0.4 s calls in under a second: in flight together
    }
    capped = dataclasses.replace(limits, mcp_in_flight=2)
    assert "at most 2 at once" in run_probe(rt, ["gather", "desk", "3"], capped)["error"]


def test_the_server_config_names_mcp_servers() -> None:
    config = ServerConfig.from_dict(
        {"mcp_servers": {"desk": {"url": "http://127.0.0.1:9/mcp"},
                         "files": {"command": ["mcp-files", "--root", "/srv/my docs"]}}}
    )  # fmt: skip
    assert config.instance_limits().mcp_servers == (
        ("desk", "http://127.0.0.1:9/mcp"),
        ("files", "mcp-files --root '/srv/my docs'"),
    )
    with pytest.raises(ConfigError, match="give a url"):
        ServerConfig.from_dict({"mcp_servers": {"desk": {"url": "ftp://x"}}})
    assert grant("calc", "python calc.py") == ("calc", "python calc.py")  # `pie run --mcp`
    with pytest.raises(ValueError, match="use letters"):
        grant("a b", "http://127.0.0.1/mcp")


# ---- tool_docs_pruning: the docs read once, then dropped --------------------------------------------
TASK = "Plan a day in Lima: the weather, and what 100 dollars is in soles."
CALLS = {
    "weather_forecast": {"city": "Lima"},
    "convert_currency": {"amount": 100, "source": "USD", "target": "PEN"},
    "lookup_city": {"city": "Lima"},
    "add": {"a": 2, "b": 3},
}


def run_agent(rt: Runtime, limits: InstanceLimits, mode: str, answer_tokens: int) -> Any:
    """tool_docs_pruning sandboxed and natively: equal but for the step times. Parsed."""
    args = ["desk", mode, TASK, json.dumps(CALLS), str(answer_tokens)]
    outs = [
        json.loads(rt.run(name, args, native=name.endswith("native"), limits=limits))
        for name in ("tool_docs", "tool_docs-native")
    ]
    times = [{k: o.pop(k) for k in ("step_ms_with_docs", "step_ms_after")} for o in outs]
    assert outs[0] == outs[1]
    return outs[0] | times[0]


def _tokens(text: str) -> list[int]:
    return [b + OFFSET for b in text.encode()]


def _text(tokens: list[int]) -> str:
    return bytes(t - OFFSET for t in tokens).decode()


def _pages(slots: int) -> int:
    return -(-slots // PAGE)


def test_tool_docs_are_read_once_then_freed_or_hidden(rt: Runtime, limits: InstanceLimits) -> None:
    n = 24
    runs = {mode: run_agent(rt, limits, mode, n) for mode in ("free", "mask", "keep")}
    free, mask, keep = runs["free"], runs["mask"], runs["keep"]
    assert free["chosen"] == mask["chosen"] == keep["chosen"]  # chosen before the drop
    assert len(free["chosen"]) == 2 and free["docs_tokens"] > 6000
    task = f"[system]{runpy.run_path(str(TOOL_DOCS))['SYSTEM']}\n[user]{TASK}\n"
    assert free["task_tokens"] == len(_tokens(task))
    notes = f"[system]{free['notes']}\n[assistant]"
    choice = " " + ", ".join(free["chosen"])  # after "Tools needed:"
    with_docs = free["task_tokens"] + free["docs_tokens"] + len(choice)  # slots, the last pending
    for out in runs.values():  # the docs' pages, held while choosing
        assert out["pages_with_docs"] == _pages(with_docs)
    # free: every page past the task went back; the answer sees the task and the notes only.
    assert free["pages_after"] == _pages(len(_tokens(task + notes)) - 1)
    assert free["answer"] == _text(reference_generation(_tokens(task + notes), n))
    # mask: the pages stay held, but no later token sees the docs (only the choice's ":" on).
    assert mask["pages_after"] == _pages(with_docs + len(_tokens(notes)))
    assert mask["answer"] == _text(reference_generation(_tokens(task + ":" + choice + notes), n))
    assert keep["pages_after"] == mask["pages_after"] and keep["answer"] != mask["answer"]
    # The chosen tools were called (those the task gave arguments for), their results seen.
    assert [r.split(" -> ")[0] for r in free["results"]] == [
        c for c in free["chosen"] if c in CALLS
    ]


@pytest.fixture(scope="module")
def real_rt(pie_cache: Path) -> Iterator[Runtime]:
    import torch

    from pie.engine.engine import Engine

    engine = Engine.load(None, dtype=torch.float32, num_pages=512)
    with make_runtime(engine, pie_cache) as runtime:
        runtime.add_source(TOOL_DOCS, name="tool_docs")
        runtime.add_source(TOOL_DOCS, name="tool_docs-native", native=True)
        yield runtime
        assert_pool_whole(runtime)


def test_tool_docs_pruning_end_to_end_on_the_real_model(
    real_rt: Runtime, limits: InstanceLimits
) -> None:
    out = run_agent(real_rt, limits, "free", 16)
    page = real_rt.engine.page_size  # type: ignore[attr-defined]
    assert out["docs_tokens"] > 1500  # a few thousand tokens of documentation, read once
    assert len(set(out["chosen"])) == 2 and set(out["chosen"]) <= set(CALLS) | {
        "search_flights", "book_table", "fail", "hang"}  # fmt: skip
    # The docs' pages went back: what is left is the task and the short notes.
    assert out["pages_with_docs"] >= _pages_of(out["task_tokens"] + out["docs_tokens"], page)
    assert out["pages_after"] <= _pages_of(out["task_tokens"] + 200, page)
    assert [r.split(" -> ")[0] for r in out["results"]] == [c for c in out["chosen"] if c in CALLS]
    assert out["answer"].strip()


def _pages_of(slots: int, page: int) -> int:
    return -(-slots // page)
