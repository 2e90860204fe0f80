"""`python -m bench.isolation`: what one heavy or failing program costs the others.

Two measurements, on the embedded SmolLM2 on the CPU, with the inferlets in worker processes:

  prefill   A greedy "canary" decodes 128 tokens alone, then again while another program
            prefills a long prompt (`--prompt-tokens`, default 4,096). Its inter-token
            latency (p50 and p99 over the tokens emitted while the prompt was prefilled)
            beside the prompt, over its own alone: with the scheduler's prefill pacing
            (default, `decode_latency_factor` 2) and with the token budget only (the pacing
            off), in the same run. The prompt's time to finish is printed for both.
  failures  `--failures` instances (default 500) that raise at once, run one after another
            (20 at a time): resident memory and open descriptors of the runtime's processes
            before and after, and how many instances are left. Nothing may stay behind.

Prints `isolation canary_p99_ratio_paced=... canary_p99_ratio_unpaced=... rss_after_failures_mib=
... fds_delta=...`; record it in bench/RESULTS.md with the machine and date.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import time
from pathlib import Path

from bench.engine import machine, make_prompts
from bench.overhead import runtime_rss
from pie.control.pacing import DECODE_LATENCY_FACTOR
from pie.control.scheduler import BatchScheduler
from pie.engine.engine import Engine
from pie.runtime.build import build_inferlet
from pie.runtime.errors import InstanceFailed
from pie.runtime.runtime import Runtime
from pie.runtime.session import QueueSession

GUEST = Path(__file__).with_name("isolation_guest.py")
CANARY_TOKENS = 128


def canary_gaps(
    rt: Runtime, prompt: list[int], during: list[int] | None
) -> tuple[list[float], float]:
    """Seconds between the canary's tokens (while `during` is prefilled, if given), and the
    seconds the prompt took (0 without one)."""
    stamps: list[float] = []
    session = QueueSession(on_text=lambda _id, _text: stamps.append(time.perf_counter()))
    canary = rt.launch(
        "iso", ["canary", json.dumps(prompt), str(CANARY_TOKENS * 4)], session=session
    )
    enough = 4 if during is not None else 4 + CANARY_TOKENS
    while len(stamps) < enough:  # decoding before the prompt arrives (alone: all of it)
        time.sleep(0.001)
    took = 0.0
    if during is not None:
        began = time.perf_counter()
        rt.launch("iso", ["prefill", json.dumps(during)]).wait(600)
        took = time.perf_counter() - began
        window = [t for t in stamps if began <= t <= began + took]
    canary.cancel("measured")
    with contextlib.suppress(InstanceFailed):
        canary.wait(30)
    if during is None:
        window = stamps[4 : 4 + CANARY_TOKENS]
    gaps = [b - a for a, b in itertools.pairwise(window)]
    return gaps, took


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 2 else float("nan")


def prefill_isolation(engine: Engine, prompt_tokens: int, factor: float) -> dict[str, float]:
    canary_prompt = make_prompts(engine, 1, 32)[0]
    long_prompt = make_prompts(engine, 1, prompt_tokens)[0]
    out: dict[str, float] = {}
    for label, pace in (("paced", factor), ("unpaced", None)):
        scheduler = BatchScheduler(engine, max_batch_tokens=512, decode_latency_factor=pace)
        with Runtime(engine, scheduler=scheduler) as rt:
            rt.add_component(build_inferlet(GUEST), name="iso")
            alone, _ = canary_gaps(rt, canary_prompt, None)
            beside, took = canary_gaps(rt, canary_prompt, long_prompt)
        out[f"alone_p99_ms_{label}"] = p99(alone) * 1e3
        out[f"beside_p50_ms_{label}"] = statistics.median(beside) * 1e3 if beside else float("nan")
        out[f"beside_p99_ms_{label}"] = p99(beside) * 1e3
        out[f"prompt_s_{label}"] = took
        out[f"ratio_{label}"] = p99(beside) / p99(alone)
        print(
            f"  {label:8s} canary alone p99 {p99(alone) * 1e3:7.1f} ms | beside a "
            f"{prompt_tokens}-token prefill: p50 {out[f'beside_p50_ms_{label}']:7.1f} ms, p99 "
            f"{p99(beside) * 1e3:7.1f} ms ({out[f'ratio_{label}']:.2f}x) | prompt took {took:.1f} s",
            flush=True,
        )
    return out


def open_fds(rt: Runtime) -> int:
    pids = [os.getpid()] + [w.process.pid for w in (rt.workers.workers if rt.workers else [])]
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids)


def failure_isolation(engine: Engine, count: int) -> dict[str, float]:
    with Runtime(engine) as rt:
        rt.add_component(build_inferlet(GUEST), name="iso")
        for _ in range(20):  # warm: workers started, the component loaded everywhere
            with contextlib.suppress(InstanceFailed):
                rt.launch("iso", ["fail", "1000"]).wait(30)
        rss0, fds0 = runtime_rss(rt), open_fds(rt)
        rss: list[float] = []
        began = time.perf_counter()
        for _ in range(2):  # a second round shows whether memory keeps growing or was reused
            for start in range(0, count, 20):
                size = min(20, count - start)
                batch = [rt.launch("iso", ["fail", str(2**20)]) for _ in range(size)]
                for instance in batch:
                    with contextlib.suppress(InstanceFailed):
                        instance.wait(60)
            rss.append(runtime_rss(rt) / 2**20)
        took = time.perf_counter() - began
        fds1 = open_fds(rt)
        left = len(rt.instances())
    print(
        f"  2 x {count} failed instances (1 MiB error each) in {took:.1f} s: RSS "
        f"{rss0 / 2**20:.0f} -> {rss[0]:.0f} -> {rss[1]:.0f} MiB (the heap keeps freed memory "
        f"for reuse), open descriptors {fds0} -> {fds1}, instances left {left}",
        flush=True,
    )
    return {"rss_round1_mib": rss[0], "rss_after_mib": rss[1], "fds_delta": fds1 - fds0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=4096)
    parser.add_argument("--failures", type=int, default=500)
    parser.add_argument("--factor", type=float, default=DECODE_LATENCY_FACTOR, help="pacing")
    parser.add_argument("--skip-failures", action="store_true")
    args = parser.parse_args()
    print(f"# {machine()}", flush=True)
    engine = Engine.load(None, num_pages=2048)
    fail = {"rss_after_mib": float("nan"), "fds_delta": 0.0}
    if not args.skip_failures:
        fail = failure_isolation(engine, args.failures)
    pre = prefill_isolation(engine, args.prompt_tokens, args.factor)
    print(
        f"isolation canary_p99_ratio_paced={pre['ratio_paced']:.2f} "
        f"canary_p99_ratio_unpaced={pre['ratio_unpaced']:.2f} "
        f"rss_after_failures_mib={fail['rss_after_mib']:.0f} fds_delta={fail['fds_delta']}"
    )


if __name__ == "__main__":
    main()
