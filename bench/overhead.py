"""`python -m bench.overhead`: what running generation inside sandboxed inferlets costs.

One process, one engine instance (the embedded SmolLM2 on the CPU), one run. The workload: B
concurrent requests (B = 1, 8, 32), each a 128-token prompt of English text and exactly 128 new
greedy tokens (no stop tokens, so every path does the same work), through two paths (three
with `--control`):

  engine     `pie.engine.generate.generate` over the B prompts: the engine driven directly by
             the classic loop (prefill, then one batched decode step per token). The peer.
  control    B host threads, each a decode loop submitting forwards to the same BatchScheduler
             and contexts the runtime uses: the control layer without the sandbox.
  inferlets  B instances of a prebuilt component (the guest below: fill the prompt, generate),
             launched at once and batched by the scheduler: the whole Pie path.

Why `generate` is the peer: it is what an application would run without Pie, and it needs no
threads, futures or page bookkeeping, so "inferlet_overhead" charges Pie with everything it adds
(control layer + sandbox); the control row shows how that splits. All paths share one token
budget per step (`--step-tokens`, generate's default of 2048), so prefill is chunked alike.

Wall time runs from the first request to the last token (inferlet launches included: a server
pays them). Each batch size first runs both paths untimed on short prompts (kernels for its
shapes get built), then the paths take turns `--repeats` times and the fastest run of each is
kept: other tenants of a shared machine only ever slow a run down (raise it on a busy machine).
Outputs are compared token for token. `--quick`: 32 new tokens.

Then the costs of the parts: a trivial host call from the guest, one element of a list crossing
the boundary each way, launching an instance (cold: compile; cached: already compiled), and the
resident memory of an idle instance.

Last, the inferlet path's own ceiling (`bench/ceiling.py`): the same guests against an engine
that answers every forward at once, for the delegated loop and the per-token loop, at one
worker process and the default count: tokens/s, and per token the wake-ups, host calls, bytes
between processes and host CPU. On a GPU this, not the engine, can set the pace.

The inferlets run in worker processes (`--workers`, default one per CPU), as `pie run` and
`pie serve` run them; the guest is `bench/overhead_guest.py`; `generate` hands its loop to the
host, as the SDK's `generate_tokens` does by default (`--per-token`: the guest's own loop).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from bench.ceiling import HEADER, ceiling, cpus
from bench.engine import machine, make_prompts
from pie.control import ForwardRequest
from pie.engine.engine import Engine
from pie.engine.generate import generate
from pie.engine.request import Greedy, TokenResult
from pie.runtime.build import build_inferlet
from pie.runtime.component_cache import ComponentCache
from pie.runtime.runtime import Runtime
from pie.runtime.session import QueueSession
from pie.runtime.workers.pool import default_workers

GUEST = Path(__file__).with_name("overhead_guest.py")

BATCHES = (1, 8, 32)


class Run(NamedTuple):
    seconds: float
    outputs: list[list[int]]


# ---- the three paths ------------------------------------------------------------------------------
def run_engine(engine: Engine, prompts: list[list[int]], new: int, step_tokens: int) -> Run:
    start = time.perf_counter()
    outputs = generate(engine, prompts, new, max_prefill_tokens=step_tokens)
    return Run(time.perf_counter() - start, outputs)


def run_control(rt: Runtime, prompts: list[list[int]], new: int) -> Run:
    """One thread per request, each a greedy decode loop on the runtime's scheduler."""
    outputs: list[list[int]] = [[] for _ in prompts]

    def decode(i: int) -> None:
        ctx = rt.contexts.create(1_000_000 + i)  # owners no instance uses
        tokens = list(prompts[i])
        try:
            for _ in range(new):
                request = ForwardRequest(ctx, tokens, outputs=[(len(tokens) - 1, Greedy())])
                (result,) = rt.scheduler.submit(request).result()
                assert isinstance(result, TokenResult)
                outputs[i].append(result.token_id)
                tokens = [result.token_id]
        finally:
            rt.contexts.close(ctx)

    threads = [threading.Thread(target=decode, args=(i,)) for i in range(len(prompts))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return Run(time.perf_counter() - start, outputs)


def run_inferlets(rt: Runtime, prompts: list[list[int]], new: int, delegate: bool = True) -> Run:
    start = time.perf_counter()
    loop = "1" if delegate else "0"
    instances = [rt.launch("bench", ["generate", json.dumps(p), str(new), loop]) for p in prompts]
    outputs = [json.loads(x.wait()) for x in instances]
    return Run(time.perf_counter() - start, outputs)


# ---- the parts ------------------------------------------------------------------------------------
def guest_number(rt: Runtime, *args: str) -> float:
    return float(json.loads(rt.run("bench", list(args))))


def list_costs(rt: Runtime, quick: bool) -> tuple[float, float]:
    """Seconds per element: guest → host (list<u8>), and a list<u32> both ways (poll.wait-any
    over k ids of one ready future: k ids in, k positions out, one handle lookup each)."""
    n, k, repeats = (1 << 18, 8192, 5) if quick else (1 << 20, 32768, 10)
    one_way = guest_number(rt, "to-host", str(n), str(repeats))
    one_way -= guest_number(rt, "to-host", "0", str(repeats))
    both_ways = guest_number(rt, "round-trip", str(k), str(repeats))
    both_ways -= guest_number(rt, "round-trip", "1", str(repeats))
    return one_way / n, both_ways / k


def launch_costs(rt: Runtime, wasm: bytes, repeats: int) -> tuple[float, float, float, float]:
    """(cold compile s, disk-cache load s, cached launch → guest running s, → result s)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = ComponentCache(rt.wasm_engine, "epoch", Path(tmp))
        start = time.perf_counter()
        fresh.load(wasm)
        cold = time.perf_counter() - start
        again = ComponentCache(rt.wasm_engine, "epoch", Path(tmp))
        start = time.perf_counter()
        again.load(wasm)
        disk = time.perf_counter() - start
    times = [launch_once(rt) for _ in range(repeats)]
    return (
        cold,
        disk,
        statistics.median(t[0] for t in times),
        statistics.median(t[1] for t in times),
    )


def launch_once(rt: Runtime) -> tuple[float, float]:
    """Seconds from `launch` to the guest's first host call, and to its result."""
    sent: list[float] = []
    session = QueueSession(on_text=lambda _id, _text: sent.append(time.perf_counter()))
    start = time.perf_counter()
    rt.launch("bench", ["hello"], session=session).wait()
    return sent[0] - start, time.perf_counter() - start


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def runtime_rss(rt: Runtime) -> int:
    """Resident bytes of this process and of the runtime's worker processes."""
    workers = rt.workers.workers if rt.workers is not None else []
    return rss_bytes() + sum(rss_bytes(w.process.pid) for w in workers)


def idle_memory(rt: Runtime, count: int) -> float:
    """Resident bytes per instance blocked in a host wait after starting its guest (the
    instances' worker processes counted)."""
    before = runtime_rss(rt)
    instances = [rt.launch("bench", ["idle"]) for _ in range(count)]
    deadline = time.monotonic() + 60
    while len(rt.bus.pullers.get("never", ())) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    after = runtime_rss(rt)
    for instance in instances:
        instance.cancel("benchmark done")
    for instance in instances:
        instance.done.exception()
    return (after - before) / count


# ---- report ---------------------------------------------------------------------------------------
def timed(repeats: int, paths: dict[str, Callable[[], Run]]) -> dict[str, Run]:
    """Each path `repeats` times, in turn (the order reversed every other round, so neither
    path always runs on a machine the other just warmed); the fastest run of each."""
    runs: dict[str, list[Run]] = {name: [] for name in paths}
    order = list(paths)
    for _ in range(repeats):
        for name in order:
            runs[name].append(paths[name]())
        order.reverse()
    return {name: min(found, key=lambda r: r.seconds) for name, found in runs.items()}


def pct(ours: float, peer: float) -> str:
    return f"{(ours / peer - 1) * 100:+.1f}%"


def report_batch(rt: Runtime, engine: Engine, batch: int, args: argparse.Namespace) -> str:
    """Times the paths at one batch size, prints a row, returns `bs<B>=<pct>`."""
    prompts = make_prompts(engine, batch, args.prompt_len)
    new = args.new_tokens
    paths = {
        "engine": lambda: run_engine(engine, prompts, new, args.step_tokens),
        "inferlets": lambda: run_inferlets(rt, prompts, new, not args.per_token),
    }
    if args.control:
        paths["control"] = lambda: run_control(rt, prompts, new)
    short = make_prompts(engine, batch, 16)  # kernels for this batch's shapes, built untimed
    run_engine(engine, short, 2, args.step_tokens)
    run_inferlets(rt, short, 2)
    before = rt.scheduler.stats
    best = timed(args.repeats, paths)
    after = rt.scheduler.stats
    sequences = after.mean_sequences_per_step * after.steps
    sequences -= before.mean_sequences_per_step * before.steps
    per_step = sequences / max(1, after.steps - before.steps)
    e, i = best["engine"].seconds, best["inferlets"].seconds
    same = all(run.outputs == best["engine"].outputs for run in best.values())
    control = "-", "-"
    if args.control:
        control = f"{best['control'].seconds:.2f}", pct(best["control"].seconds, e)
    print(f"{batch:>5} {e:>9.2f} {i:>12.2f} {pct(i, e):>9} {control[0]:>10} {control[1]:>9} "
          f"{batch * new / i:>7.1f} {per_step:>9.1f}  {'yes' if same else 'NO'}")  # fmt: skip
    return f"bs{batch}={(i / e - 1) * 100:.1f}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per path and batch")
    parser.add_argument(
        "--control", action="store_true", help="also time the scheduler driven without wasm"
    )
    parser.add_argument("--step-tokens", type=int, default=2048, help="token budget per step")
    parser.add_argument("--quick", action="store_true", help="32 new tokens, fewer samples")
    parser.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: CPUs)"
    )
    parser.add_argument(
        "--per-token", action="store_true", help="the guests drive their own decode loop"
    )
    parser.add_argument("--ceiling-only", action="store_true", help="only the runtime ceiling")
    args = parser.parse_args(argv)
    if args.quick:
        args.new_tokens = 32
    batches = [int(b) for b in args.batches.split(",")]

    engine = Engine.load(None, num_pages=2048)  # the ceiling's 256 instances need ~1,536
    wasm = build_inferlet(GUEST).read_bytes()  # built once per machine, cached by content
    print(f"machine: {machine()}")
    print(
        f"workload: {args.prompt_len}-token prompts, {args.new_tokens} new greedy tokens, "
        f"{args.step_tokens} tokens per step, best of {args.repeats}"
    )
    overheads: list[str] = []
    if not args.ceiling_only:
        with Runtime(engine, max_batch_tokens=args.step_tokens, workers=args.workers) as rt:
            overheads = engine_rows(rt, engine, wasm, batches, args)
    print(f"\nruntime ceiling: the engine answers at once; {cpus()} CPUs; per generated token: "
          "wake-ups, host calls, bytes between processes, µs of host CPU (all processes)")  # fmt: skip
    print(HEADER)
    rows = ceiling(engine, wasm, 32 if args.quick else 64)
    at = {(r.loop, r.workers, r.n): r.tok_s for r in rows}
    default = default_workers()
    overheads.append(f"ceiling_delegated_256={at[('delegated', default, 256)]:.0f}")
    overheads.append(f"ceiling_pertoken_256={at[('per-token', default, 256)]:.0f}")
    print("inferlet_overhead " + " ".join(overheads))


def engine_rows(
    rt: Runtime, engine: Engine, wasm: bytes, batches: list[int], args: argparse.Namespace
) -> list[str]:
    """The inferlets-vs-engine rows and the costs of the parts; returns the `bs<B>=` items."""
    overheads = []
    rt.add_component(wasm, name="bench")  # compiled (or loaded from disk) before timing
    warm = make_prompts(engine, 2, 16)
    run_engine(engine, warm, 4, args.step_tokens)
    run_inferlets(rt, warm, 4)
    print(f"\n{'batch':>5} {'engine s':>9} {'inferlets s':>12} {'overhead':>9} "
          f"{'control s':>10} {'overhead':>9} {'tok/s':>7} {'seq/step':>9}  same")  # fmt: skip
    for batch in batches:
        overheads.append(report_batch(rt, engine, batch, args))

    call = guest_number(rt, "host-calls", "2000" if args.quick else "20000")
    to_host, both = list_costs(rt, args.quick)
    cold, disk, running, finished = launch_costs(rt, wasm, 5 if args.quick else 20)
    rss = idle_memory(rt, 8 if args.quick else 32)
    print(f"\nhost call round trip (guest → host → guest, no work): {call * 1e6:.1f} µs")
    print(f"list element guest → host (list<u8>): {to_host * 1e9:.1f} ns")
    print(f"list<u32> element guest → host → guest (wait-any): {both * 1e9:.1f} ns")
    print(f"launch cold (compile {len(wasm) / 2**20:.0f} MB component): {cold:.2f} s; "
          f"from the disk cache: {disk * 1e3:.1f} ms")  # fmt: skip
    print(f"launch cached, median: {running * 1e3:.2f} ms to the guest's first host call, "
          f"{finished * 1e3:.2f} ms to the result of a no-op inferlet")  # fmt: skip
    print(f"resident memory per idle running inferlet: {rss / 2**20:.2f} MiB")
    return overheads


if __name__ == "__main__":
    main()
