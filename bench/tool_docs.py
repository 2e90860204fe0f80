"""`python -m bench.tool_docs`: the tool-docs case study's ladder, one agent task four ways.

The agent plans a day in Lima with the travel desk's MCP tools (bench/agentic/mcp_server.py,
served over streamable HTTP, each tool answering after `--tool-delay` seconds like a remote
API). Its prompt holds the tools' full documentation (~2.5k tokens); it names two tools, calls
them, and answers with their results. Each rung adds one of the paper's techniques:

1. baseline: client-driven through `pie serve`'s OpenAI API with `--no-prefix-cache`: a first
   request with the system prompt, the task and the docs (the model names the tools), the
   client calls the tools one after another, then a second request re-sends everything with
   the results appended;
2. + prefix cache: the same on a server with the cache: the second request reuses the pages
   of the first;
3. + concurrent tool calls: the agent as one inferlet (inferlets/tool_docs_pruning.py, mode
   `keep`) next to the model: nothing re-sent, the tools called together as MCP futures;
4. + dropped tool docs: the same inferlet, mode `free`: the docs' pages freed once the tools
   are chosen; the answer is decoded over the task and the tools' signatures only.

Per rung: end-to-end latency of the task, and tokens prefilled (the server's /metrics: tokens
run less forward passes; a decode step prefills nothing). `ladder()` returns the printed lines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import runpy
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from bench.serve_peers import RunningServer, free_port, http_json, http_text, pie_peer

ROOT = Path(__file__).resolve().parent.parent
AGENT = ROOT / "inferlets" / "tool_docs_pruning.py"
TOOL_SERVER = ROOT / "bench" / "agentic" / "mcp_server.py"
TASK = "Plan a day in Lima: the weather, and what 100 dollars is in soles."
CALLS = {  # the arguments the task gives each tool the agent may pick
    "weather_forecast": {"city": "Lima"},
    "convert_currency": {"amount": 100, "source": "USD", "target": "PEN"},
    "lookup_city": {"city": "Lima"},
}
PICKS = 2
CHOICE_TOKENS = 12  # the client-driven agent's tool choice (the inferlet's is held to names)
ANSWER_TOKENS = 32


def prefilled(url: str) -> float:
    """Tokens the server has prefilled so far: tokens run less forward passes."""
    values = {"pie_engine_tokens_total": 0.0, "pie_batch_sequences_sum": 0.0}
    for line in http_text(url + "/metrics", timeout=30).splitlines():
        name, _, value = line.partition(" ")
        if name in values:
            values[name] = float(value)
    return values["pie_engine_tokens_total"] - values["pie_batch_sequences_sum"]


async def list_tools(mcp_url: str) -> list[Any]:
    from mcp import Client

    async with Client(mcp_url, mode="legacy") as client:
        return list((await client.list_tools()).tools)


async def call_in_turn(mcp_url: str, names: list[str]) -> list[str]:
    """The client-driven agent's tool calls, one after another."""
    from mcp import Client

    seen = []
    async with Client(mcp_url, mode="legacy") as client:
        for name in names:
            result = await client.call_tool(name, CALLS[name])
            seen.append(f"{name} -> " + "\n".join(b.text for b in result.content))
    return seen


def client_agent(url: str, mcp_url: str, task: str) -> None:
    """Rungs 1-2: the agent loop in the client, every turn re-sending the whole prompt."""
    agent = runpy.run_path(str(AGENT))
    from pie.sdk.mcp import Tool

    tools = [
        Tool(t.name, t.description or "", t.input_schema) for t in asyncio.run(list_tools(mcp_url))
    ]
    docs = "Tool documentation:\n\n" + "\n".join(agent["docs_page"](t) for t in tools)
    messages = [
        {"role": "system", "content": agent["SYSTEM"]},
        {"role": "user", "content": task},
        {"role": "system", "content": docs},
    ]
    body = {"model": "smollm2-135m-instruct", "temperature": 0}
    reply = http_json(
        url + "/v1/chat/completions",
        {**body, "messages": messages, "max_tokens": CHOICE_TOKENS},
        timeout=600,
    )["choices"][0]["message"]["content"]
    named = [t.name for t in tools if t.name in reply]
    chosen = (named or list(CALLS))[:PICKS]  # a reply naming no tool: the task's own
    results = asyncio.run(call_in_turn(mcp_url, [c for c in chosen if c in CALLS]))
    signatures = "\n".join(t.signature() for t in tools if t.name in chosen)
    notes = f"Tools chosen:\n{signatures}\nResults:\n" + "\n".join(results)
    messages += [{"role": "assistant", "content": reply}, {"role": "system", "content": notes}]
    http_json(
        url + "/v1/chat/completions",
        {**body, "messages": messages, "max_tokens": ANSWER_TOKENS},
        timeout=600,
    )


async def inferlet_agent(url: str, program: str, mode: str, task: str) -> dict[str, Any]:
    """Rungs 3-4: the agent as one inferlet on the server."""
    from pie.client import PieClient

    async with PieClient.connect(url + "/ws") as pie:
        args = ["desk", mode, task, json.dumps(CALLS), str(ANSWER_TOKENS), str(PICKS)]
        instance = await pie.launch(program, args)
        return dict(json.loads(await instance.wait()))


async def upload_agent(url: str) -> str:
    from pie.client import PieClient
    from pie.runtime.build import build_inferlet

    async with PieClient.connect(url + "/ws") as pie:
        return await pie.upload(build_inferlet(AGENT).read_bytes(), name=AGENT.stem)


def rung(label: str, url: str, run: Callable[[], Any]) -> tuple[str, float, float, Any]:
    """(label, seconds, tokens prefilled, what `run` returned) for one run of the task."""
    before, began = prefilled(url), time.perf_counter()
    out = run()
    return label, time.perf_counter() - began, prefilled(url) - before, out


def ladder(tool_delay: float = 0.5) -> list[str]:
    """Runs the four rungs (two servers, one tool server); returns the lines to print."""
    logs = Path(tempfile.mkdtemp(prefix="pie-bench-tool-docs-"))
    port = free_port()
    mcp_url = f"http://127.0.0.1:{port}/mcp"
    tool_server = subprocess.Popen(
        [sys.executable, str(TOOL_SERVER), "--http", str(port), "--delay", str(tool_delay)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    config = logs / "serve.toml"
    config.write_text(f'[mcp_servers.desk]\nurl = "{mcp_url}"\n')
    # Instances in the server process (--workers 0): its one MCP session serves every rung.
    common = ["--config", str(config), "--workers", "0"]
    rows = []
    try:
        _wait_for(mcp_url)
        peer = pie_peer([*common, "--no-prefix-cache"])
        with RunningServer(peer, logs / "uncached.log") as server:
            server.warm_up()
            task = "1. " + TASK  # each rung its own task: no rung reuses another's pages
            rows.append(rung("baseline: client-driven, --no-prefix-cache", peer.url,
                             partial(client_agent, peer.url, mcp_url, task)))  # fmt: skip
        peer = pie_peer(common)
        with RunningServer(peer, logs / "cached.log") as server:
            server.warm_up()
            url = peer.url
            rows.append(
                rung("+ prefix cache", url, partial(client_agent, url, mcp_url, "2. " + TASK))
            )
            program = asyncio.run(upload_agent(url))
            asyncio.run(inferlet_agent(url, program, "free", "0. " + TASK))  # first-use costs
            for label, mode, task in (
                ("+ concurrent tool calls (inferlet)", "keep", "3. " + TASK),
                ("+ dropped tool-doc pages", "free", "4. " + TASK),
            ):
                agent = inferlet_agent(url, program, mode, task)
                rows.append(rung(label, url, partial(asyncio.run, agent)))
    finally:
        tool_server.terminate()
        tool_server.wait(10)
    lines = [f"{'rung':<44} {'latency s':>9} {'prefilled':>9}"]
    lines += [f"{label:<44} {s:9.2f} {int(n):9d}" for label, s, n, _ in rows]
    for *_, out in rows[2:]:  # the inferlet rungs
        lines.append(
            f"{out['mode']}: docs {out['docs_tokens']} tokens; pages {out['pages_with_docs']} "
            f"with them, {out['pages_after']} after; ms per step {out['step_ms_with_docs']} with "
            f"them, {out['step_ms_after']} after; chose {', '.join(out['chosen'])}"
        )
    return lines


def _wait_for(mcp_url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            asyncio.run(list_tools(mcp_url))
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tool-delay", type=float, default=0.5, help="seconds each tool takes")
    for line in ladder(parser.parse_args().tool_delay):
        print(line)


if __name__ == "__main__":
    main()
