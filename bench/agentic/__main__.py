"""`python -m bench.agentic`: agent workflows as inferlets vs the same workflows driven by a client.

Every workload (react, codeact, swarm, async_tools) runs (a) as an inferlet inside `pie serve`
and (b) as a client program doing the same steps through `pie serve`'s OpenAI API (re-sending
the growing conversation each step) with the prefix cache on, then (c) the client again with
`--no-prefix-cache`; each mode on a fresh server of its own (started one after the other), so
neither finds the other's identical conversations in the cache; same model, greedy, same tool
servers (one per tool latency, on loopback), same run. Per point: throughput (tasks/s), p50
latency, forward passes, tokens computed, prefilled and recomputed (a mode's prefilled tokens
beyond the inferlet's, which runs each conversation token once), prefix-cache hits, and whether
the answers equal the inferlet's. The full grid (`--full`: I/Os 1, 2, 8, 32 x tool latency 0
and 100 ms x 1 and 16 agents, every workload) takes hours on a 2-core CPU; the default is a
reduced sweep (printed first). Last line: `agentic_speedup react=<x> codeact=<x> swarm=<x>
async_tools=<x>`, inferlet over client throughput (prefix cache on) at 8 I/Os, 16 agents, 100 ms.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import itertools
import tempfile
from contextlib import ExitStack
from pathlib import Path

from bench.agentic.harness import HEADER, Measured, Point, run_all
from bench.agentic.tool_server import ToolServer
from bench.agentic.workload import Setting, Workload
from bench.serve_peers import RunningServer, pie_peer

WORKLOADS = ["react", "codeact", "swarm", "async_tools"]
FULL_IOS, FULL_LATENCIES_MS, FULL_AGENTS = [1, 2, 8, 32], [0.0, 100.0], [1, 16]
HEADLINE = Setting(ios=8, tool_latency_s=0.1, agents=16)
# The default sweep (~25 min on the 2-core CPU): the headline point for every workload, and for
# react how the gain moves with I/Os per agent; without --full the server without prefix cache
# runs only the headline points.
REACT_EXTRA = [Setting(1, 0.1, 16), Setting(2, 0.1, 16)]
WARM_UP = Setting(ios=1, tool_latency_s=0.0, agents=1)


def load_workloads(names: list[str]) -> dict[str, Workload]:
    found = {}
    for name in names:
        try:
            module = importlib.import_module(f"bench.agentic.{name}")
        except ModuleNotFoundError as e:
            print(f"note: workload {name} skipped: bench/agentic/{name}.py is missing ({e})")
            continue
        found[name] = module.WORKLOAD
    return found


def points_of(args: argparse.Namespace, names: list[str]) -> list[Point]:
    if args.full or args.ios or args.latency_ms or args.agents:
        ios = args.ios or (FULL_IOS if args.full else [HEADLINE.ios])
        latencies = args.latency_ms or (FULL_LATENCIES_MS if args.full else [100.0])
        agents = args.agents or (FULL_AGENTS if args.full else [HEADLINE.agents])
        grid = [Setting(i, ms / 1000, a) for i, ms, a in itertools.product(ios, latencies, agents)]
        return [Point(n, s) for n in names for s in grid]
    points = [Point(n, HEADLINE) for n in names]
    return points + [Point("react", s) for s in REACT_EXTRA if "react" in names]


def compare(log: list[Measured]) -> None:
    """Recomputed tokens and equal answers of the client modes, against the inferlet's run."""
    inferlet = {m.point: m for m in log if m.mode == "inferlet"}
    print("\nworkload     ios  tool_ms agents mode            recomputed  equal_answers  errors")
    for m in log:
        base = inferlet.get(m.point)
        if base is None:
            continue
        pairs = list(zip(base.results, m.results, strict=True))
        equal = sum(a is not None and b is not None and a.answer == b.answer for a, b in pairs)
        s = m.point.setting
        print(
            f"{m.point.workload:12s} {s.ios:3d} {s.tool_latency_s * 1000:8.0f} {s.agents:6d} "
            f"{m.mode:14s} {m.prefilled - base.prefilled:10d} {equal:8d}/{len(pairs):<5d} "
            f"{'; '.join(m.errors)[:120]}"
        )


def speedups(log: list[Measured]) -> dict[str, float | None]:
    found: dict[str, float | None] = dict.fromkeys(WORKLOADS)
    for name in WORKLOADS:
        point = Point(name, HEADLINE)
        runs = {m.mode: m for m in log if m.point == point}
        if "inferlet" in runs and "client" in runs:
            found[name] = runs["inferlet"].throughput / runs["client"].throughput
    return found


def ladder() -> None:
    """The case-study ladder (+prefix cache, +concurrent tool calls, +dropped tool-doc pages)
    from `bench.tool_docs`, where that module exists."""
    if importlib.util.find_spec("bench.tool_docs") is None:
        print("\nnote: bench/tool_docs.py is missing: no case-study ladder")
        return
    print("\ncase-study ladder (bench.tool_docs):", flush=True)
    try:
        lines = importlib.import_module("bench.tool_docs").ladder()
    except Exception as e:  # its own servers; a failure there must not hide this run's results
        print(f"the ladder failed: {type(e).__name__}: {e}")
        return
    for line in [lines] if isinstance(lines, str) else lines:
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="the whole grid (hours on a CPU)")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=WORKLOADS)
    parser.add_argument("--ios", nargs="+", type=int, help="I/Os (tool calls) per agent")
    parser.add_argument("--latency-ms", nargs="+", type=float, help="tool latencies")
    parser.add_argument("--agents", nargs="+", type=int, help="agents at once")
    parser.add_argument("--no-off", action="store_true", help="skip the --no-prefix-cache server")
    parser.add_argument("--no-ladder", action="store_true", help="skip bench.tool_docs's ladder")
    args = parser.parse_args()
    workloads = load_workloads(args.workloads)
    points = points_of(args, list(workloads))
    print("points run (workload: I/Os, tool ms, agents):")
    for p in points:
        s = p.setting
        print(f"  {p.workload}: {s.ios}, {s.tool_latency_s * 1000:.0f}, {s.agents}")
    if "async_tools" in workloads:
        print("note: async_tools makes one tool call per task whatever the I/Os of its point")
    latencies = sorted({p.setting.tool_latency_s for p in points} | {WARM_UP.tool_latency_s})
    logs = Path(tempfile.mkdtemp(prefix="pie-bench-agentic-"))
    log: list[Measured] = []
    with ExitStack() as stack:
        tools = {s: stack.enter_context(ToolServer(s)).url for s in latencies}
        # One fresh server per mode, the points in the same order on each: a mode must not find
        # the pages of the other's identical conversations in the prefix cache (greedy runs of
        # the same task are token for token the same), and each sees its own history alike.
        headline = [p for p in points if p.setting == HEADLINE or args.full]
        servers: list[tuple[str, tuple[str, ...], str, list[Point]]] = [
            ("on", (), "inferlet", points),
            ("on", (), "client", points),
        ]
        if not args.no_off:
            servers.append(("off", ("--no-prefix-cache",), "client-nocache", headline))
        for label, extra, mode, run in servers:
            with RunningServer(pie_peer(extra), logs / f"{mode}.log") as server:
                print(f"\npie serve, prefix cache {label}, {mode}; warm-up (builds, first calls):")
                server.warm_up()
                run_all(
                    server, workloads, [Point(n, WARM_UP) for n in workloads], [mode], tools, []
                )
                print(f"measured:\n{HEADER}", flush=True)
                run_all(server, workloads, run, [mode], tools, log)
    compare(log)
    found = speedups(log)
    shown = " ".join(f"{n}={'n/a' if x is None else f'{x:.2f}'}" for n, x in found.items())
    print(f"agentic_speedup {shown}", flush=True)  # also here: the ladder runs long
    if not args.no_ladder:
        ladder()
    print(f"agentic_speedup {shown}")


if __name__ == "__main__":
    main()
