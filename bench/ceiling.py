"""The inferlet path's own ceiling: guests against an engine that answers every forward at once.

`InstantEngine` keeps the real engine's shapes, tokenizer and checks and returns a fixed token
for every requested output, so whatever rate the runtime reaches is what no engine speed can
raise. Measured for the delegated loop (`generate_tokens`, the host runs it) and the per-token
loop (`delegate=False`: one `execute-wait` per token), at N = 1, 32 and 256 instances, on one
worker process and on the default count. Per generated token: wake-ups (voluntary context
switches of every thread of the control process and the workers), host calls, bytes crossing
between the processes, and µs of host CPU (all processes).
"""

from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import dataclass

from pie.control.scheduler import BatchScheduler
from pie.engine.engine import Engine
from pie.engine.request import ForwardBatch, ForwardResult, SequenceForward, TokenResult
from pie.runtime import wasm_calls
from pie.runtime.runtime import Runtime
from pie.runtime.workers.pool import default_workers

SIZES = (1, 32, 256)
PROMPT = 16


class InstantEngine:
    """The engine's contract at no cost: `engine`'s shapes, tokenizer and checks, and a fixed
    token for every requested output, returned at once."""

    def __init__(self, engine: Engine, token: int) -> None:
        self.engine = engine
        self.token = token
        self.model_name = engine.model_name
        self.num_pages: int = engine.num_pages
        self.page_size: int = engine.page_size
        self.vocab_size: int = engine.vocab_size
        self.max_position: int = engine.max_position
        self.tokenizer = engine.tokenizer

    def validate(self, seq: SequenceForward) -> None:
        self.engine.validate(seq)  # the real checks, at their real cost

    def execute(self, batch: ForwardBatch) -> ForwardResult:
        return ForwardResult([[TokenResult(self.token)] * len(s.outputs) for s in batch.sequences])

    def copy_pages(self, pairs: list[tuple[int, int, int]]) -> None:
        pass


@dataclass(frozen=True)
class Usage:
    """What the runtime's processes have spent so far (summed over all of them)."""

    wakeups: float
    host_calls: float
    bytes: float
    cpu_seconds: float
    control_cpu_seconds: float  # of cpu_seconds, the control process's (scheduler, plane)

    def __sub__(self, other: Usage) -> Usage:
        return Usage(*(a - b for a, b in zip(self.fields(), other.fields(), strict=True)))

    def fields(self) -> tuple[float, ...]:
        return (self.wakeups, self.host_calls, self.bytes, self.cpu_seconds,
                self.control_cpu_seconds)  # fmt: skip

    def per(self, tokens: int) -> Usage:
        return Usage(*(f / tokens for f in self.fields()))


def usage(rt: Runtime) -> Usage:
    own = resource.getrusage(resource.RUSAGE_SELF)
    wakeups, calls = float(own.ru_nvcsw), float(wasm_calls.CALLS[0])
    cpu, crossed = own.ru_utime + own.ru_stime, 0.0
    control = cpu
    for worker in rt.workers.counters() if rt.workers is not None else []:
        wakeups += worker["voluntary_switches"]
        calls += worker["host_calls"]
        cpu += worker["cpu_seconds"]
        crossed += worker["bytes_sent"] + worker["bytes_received"]
    return Usage(wakeups, calls, crossed, cpu, control)


@dataclass(frozen=True)
class CeilingRow:
    loop: str
    workers: int
    n: int
    tok_s: float
    per_token: Usage

    def line(self) -> str:
        u = self.per_token
        return (
            f"{self.loop:>9} {self.workers:>7} {self.n:>5} {self.tok_s:>9.0f} {u.wakeups:>8.2f} "
            f"{u.host_calls:>6.2f} {u.bytes:>7.0f} {u.cpu_seconds * 1e6:>8.1f} "
            f"{u.control_cpu_seconds * 1e6:>9.1f}"
        )


HEADER = f"{'loop':>9} {'workers':>7} {'N':>5} {'tok/s':>9} {'wake/tok':>8} {'calls':>6} {'bytes':>7} {'cpu µs':>8} {'control µs':>9}"


def measure(
    engine: Engine, wasm: bytes, n: int, new: int, workers: int, delegated: bool
) -> CeilingRow:
    prompt = engine.tokenizer.encode("The inferlet path's ceiling " * 4)[:PROMPT]
    pages = n * (-(-(PROMPT + new) // engine.page_size) + 1)
    if pages > engine.num_pages:
        raise ValueError(f"the ceiling at N={n} needs {pages} KV pages; load the engine with more")
    instant = InstantEngine(engine, prompt[0])
    scheduler = BatchScheduler(
        instant, max_batch_tokens=max(4096, n * PROMPT), max_batch_sequences=n
    )
    args = ["generate", json.dumps(prompt), str(new), "1" if delegated else "0"]
    with Runtime(instant, scheduler=scheduler, max_instances=n, workers=workers) as rt:
        rt.add_component(wasm, name="bench")
        for x in [rt.launch("bench", [*args[:2], "4", args[3]]) for _ in range(min(n, 8))]:
            x.wait()  # instantiated, compiled and warmed, untimed
        before = usage(rt)
        start = time.perf_counter()
        instances = [rt.launch("bench", args) for _ in range(n)]
        outputs = [json.loads(x.wait()) for x in instances]
        seconds = time.perf_counter() - start
        spent = usage(rt) - before
    assert all(len(o) == new for o in outputs)
    tokens = n * new
    loop = "delegated" if delegated else "per-token"
    return CeilingRow(loop, workers, n, tokens / seconds, spent.per(tokens))


def ceiling(
    engine: Engine, wasm: bytes, new: int, sizes: tuple[int, ...] = SIZES
) -> list[CeilingRow]:
    counts = sorted({1, default_workers()})
    rows = []
    for delegated in (True, False):
        for workers in counts:
            for n in sizes:
                row = measure(engine, wasm, n, new, workers, delegated)
                print(row.line(), flush=True)
                rows.append(row)
    return rows


def cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
