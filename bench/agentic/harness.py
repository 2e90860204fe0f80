"""Runs agent workloads both ways on one `pie serve` and measures each point of the sweep.

A point is a workload and a `Setting`; a mode is how its agents run: `inferlet` (launched over
the WebSocket protocol, the program runs next to the model) or `client` (the workload's client
twin through the same server's OpenAI API). All `agents` agents of a point start at once; each
task's latency is from its start to its answer. Engine work comes from the server's `/metrics`
before and after: forward passes (`pie_batch_sequences`: sequences over all engine steps),
tokens computed (`pie_engine_tokens`), tokens prefilled (tokens computed less forward passes:
each pass's last token is the one it samples from, so a decode step prefills nothing), prompt
tokens served from the prefix cache, and the engine's busy time (`pie_step_seconds`: near the
wall time, the engine bounds the run; far below it, something else does).
"""

from __future__ import annotations

import asyncio
import statistics
import time
import traceback
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path

from openai import AsyncOpenAI

from bench.agentic.workload import Setting, TaskResult, Workload
from bench.serve_peers import RunningServer, http_text
from pie.client import PieClient
from pie.runtime.build import build_inferlet

AGENT_TIMEOUT_S = 600.0  # one agent's task; past it the agent counts as failed, never hangs
METRICS = {
    "forwards": "pie_batch_sequences_sum",
    "tokens": "pie_engine_tokens_total",
    "cache_hits": "pie_prefix_cache_hit_tokens",
    "engine_s": "pie_step_seconds_sum",
}


@dataclass(frozen=True)
class Point:
    workload: str
    setting: Setting


@dataclass
class Measured:
    """One point run one way."""

    point: Point
    mode: str  # inferlet | client | client-nocache
    seconds: float  # wall time until the last agent finished
    latencies: list[float]
    results: list[TaskResult | None]  # by task; None where the agent failed
    errors: list[str]
    engine: dict[str, float] = field(default_factory=dict)  # /metrics deltas (METRICS keys)

    @property
    def throughput(self) -> float:
        return len(self.results) / self.seconds

    @property
    def latency_p50(self) -> float:
        return statistics.median(self.latencies) if self.latencies else float("nan")

    @property
    def prefilled(self) -> int:
        return int(self.engine["tokens"] - self.engine["forwards"])


def scrape(server: RunningServer) -> dict[str, float]:
    """The METRICS counters now (0 for one the server does not export)."""
    values = dict.fromkeys(METRICS, 0.0)
    text = server.metrics_text() or http_text(server.peer.url + "/metrics", timeout=30)
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        for key, metric in METRICS.items():
            if name == metric:
                values[key] = float(value)
    return values


class Programs:
    """Each workload's inferlet, built and uploaded once per server."""

    def __init__(self) -> None:
        self.hashes: dict[Path, str] = {}

    async def upload(self, client: PieClient, source: Path) -> str:
        if source not in self.hashes:
            wasm = await asyncio.to_thread(lambda: build_inferlet(source).read_bytes())
            self.hashes[source] = await client.upload(wasm, name=source.stem)
        return self.hashes[source]


async def _timed(
    index: int, run: Awaitable[TaskResult]
) -> tuple[int, float, TaskResult | None, str]:
    began = time.perf_counter()
    try:
        result = await asyncio.wait_for(run, AGENT_TIMEOUT_S)
        return index, time.perf_counter() - began, result, ""
    except Exception as e:  # an agent's failure is a result of the run, not the bench's end
        return index, time.perf_counter() - began, None, f"{type(e).__name__}: {e}"


async def run_point(
    server: RunningServer,
    workload: Workload,
    setting: Setting,
    mode: str,
    tools_url: str,
    programs: Programs,
) -> Measured:
    """Runs `setting.agents` agents (tasks 0..agents-1) at once, one way: `inferlet`, or
    `client`/`client-nocache` (the client twin; the name says which server it ran on)."""
    point = Point(workload.name, setting)
    before = scrape(server)
    began = time.perf_counter()
    if mode == "inferlet":
        async with PieClient.connect(server.peer.url + "/ws") as pie:
            program = await programs.upload(pie, workload.inferlet)
            began = time.perf_counter()  # the upload is not an agent's work

            async def agent(task: int) -> TaskResult:
                args = workload.inferlet_args(task, setting, tools_url)
                instance = await pie.launch(program, args)
                return workload.parse_result(await instance.wait())

            runs = await asyncio.gather(*(_timed(t, agent(t)) for t in range(setting.agents)))
    else:
        client = AsyncOpenAI(
            base_url=server.peer.url + "/v1", api_key="unused", max_retries=0, timeout=600
        )
        try:
            model = server.model_id
            runs = await asyncio.gather(
                *(
                    _timed(t, workload.run_client(client, model, t, setting, tools_url))
                    for t in range(setting.agents)
                )
            )
        finally:
            await client.close()
    seconds = time.perf_counter() - began
    after = scrape(server)
    runs.sort()
    errors = [f"task {i}: {error}" for i, _, _, error in runs if error]
    return Measured(
        point,
        mode,
        seconds,
        [s for _, s, r, _ in runs if r is not None],
        [r for _, _, r, _ in runs],
        errors,
        {k: after[k] - before[k] for k in METRICS},
    )


def run_all(
    server: RunningServer,
    workloads: dict[str, Workload],
    points: list[Point],
    modes: list[str],
    tools: dict[float, str],
    log: list[Measured],
) -> None:
    """Every point in every mode on `server`, in order; prints a row as each ends."""
    programs = Programs()
    for point in points:
        for mode in modes:
            url = tools[point.setting.tool_latency_s]
            try:
                m = asyncio.run(
                    run_point(server, workloads[point.workload], point.setting, mode, url, programs)
                )
            except Exception:
                traceback.print_exc()
                continue
            log.append(m)
            print(row(m), flush=True)


HEADER = (
    "workload     ios  tool_ms agents mode            tasks/s  p50_s   forwards  computed"
    "  prefilled  cache_hit  engine_s  ok"
)


def row(m: Measured) -> str:
    s = m.point.setting
    ok = sum(r is not None for r in m.results)
    e = m.engine
    return (
        f"{m.point.workload:12s} {s.ios:3d} {s.tool_latency_s * 1000:8.0f} {s.agents:6d} "
        f"{m.mode:14s} {m.throughput:8.3f} {m.latency_p50:6.2f} {e['forwards']:10.0f} "
        f"{e['tokens']:9.0f} {m.prefilled:10d} {e['cache_hits']:10.0f} {e['engine_s']:9.1f} "
        f"{ok:3d}/{len(m.results)}"
    )
