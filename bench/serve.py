"""`python -m bench.serve`: pie serve against `transformers serve --continuous-batching` and
llama.cpp's `llama-server` under the same aiperf load, one server at a time, on loopback.

Method. Each server runs as its own process on the embedded SmolLM2 (pie: the GGUF, default
settings; HF: the folder `pie export-hf` rebuilds from that GGUF; llama-server: the GGUF, with
as many slots as the level's concurrency, restarted per level). aiperf drives
`/v1/chat/completions`, streaming, with synthetic prompts of mean 256 and sd 128 tokens (one
seed, so every server gets the same prompts per level) and 128 output tokens, at each
concurrency, for max(8, 2 x concurrency) requests or 240 s of issuing (then 60 s of grace for
those in flight), whichever ends first; output tok/s is aiperf's (output tokens /
level duration). aiperf paces its issue loop at 50 ticks/s (see serve_load.py), so a freed slot
waits <= 20 ms for its next request. Each server answers two short requests first (first-call setup is not
measured). The engine's bare prefill of the concurrency-1 prompts is timed in this process after
the first server stops. Ratios are pie's output tok/s over the peer's. Artifacts (server logs,
aiperf exports, results.json) go to --out.

Columns: TTFT and ITL percentiles in ms over requests (aiperf's ITL is per request: decode time
over its tokens after the first); OSL the mean output length aiperf counted; dur the level's
duration; cpu s the CPU seconds the server's processes used and aiperf the CPU seconds aiperf's
own processes used while the level ran (its startup included); load the 1-minute load average
as the level ended (other tenants of the machine show here). For pie, from /metrics: engine
steps, generated tokens per step, the sampled mean step time and the level's wall time per step
(a wall time per step well above the step time means the engine waited on something else).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.llamacpp_build import ensure_llama_server
from bench.serve_load import LevelResult, LoadSpec, engine_delta, run_level
from bench.serve_peers import Peer, RunningServer, hf_peer, llamacpp_peer, pie_peer
from bench.serve_prefill import PrefillResult, bare_prefill

SERVERS = ("pie", "hf", "llamacpp")
LEVELS = (1, 4, 16, 64)
QUICK_LEVELS = (1, 16)


def requests_for(concurrency: int, quick: bool) -> int:
    return max(4, concurrency) if quick else max(8, 2 * concurrency)


def default_gguf() -> Path:
    from pie.engine.loader import default_model_path

    return default_model_path()


def hf_folder(gguf: Path, cache: Path) -> Path:
    """The HF folder of the GGUF (tokenizer for aiperf, weights for HF serve); rebuilt when absent."""
    folder = cache / f"hf-{gguf.stem}-{gguf.stat().st_size}"
    if (folder / ".complete").exists():
        return folder
    print(f"[bench] pie export-hf {gguf.name} -> {folder}", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pie.cli", "export-hf", str(gguf), str(folder)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    (folder / ".complete").write_text("")
    return folder


def run_server(
    peer: Peer, levels: list[int], args: argparse.Namespace, hf_dir: Path, out: Path
) -> list[LevelResult]:
    """One server (already described by `peer`) through every level."""
    results = []
    with RunningServer(peer, out / f"{peer.name}.log") as server:
        print(f"[bench] {peer.name} ready in {server.started_s:.1f} s as {server.model_id!r}")
        server.warm_up()
        for c in levels:
            results.append(level(server, c, args, hf_dir, out))
    return results


def level(
    server: RunningServer, c: int, args: argparse.Namespace, hf_dir: Path, out: Path
) -> LevelResult:
    spec = LoadSpec(
        concurrency=c,
        requests=args.requests or requests_for(c, args.quick),
        duration_s=args.level_seconds or (90.0 if args.quick else 240.0),
        isl_mean=args.isl_mean,
        isl_sd=args.isl_sd,
        osl=args.osl,
        seed=args.seed,
    )
    before = server.metrics_text() if server.peer.name == "pie" else None
    result = run_level(
        server.peer.name,
        server.peer.url,
        server.model_id,
        hf_dir,
        spec,
        server.peer.extra_inputs,
        out / server.peer.name / f"c{c}",
        server.pid,
    )
    if before is not None:
        result.engine = engine_delta(before, server.metrics_text())
    print(row(result), flush=True)
    return result


def run_llamacpp(
    levels: list[int], args: argparse.Namespace, hf_dir: Path, gguf: Path, out: Path
) -> list[LevelResult]:
    binary = ensure_llama_server()
    print(f"[bench] llama-server: {binary}")
    results = []
    for c in levels:  # -np = concurrency: a fresh server per level
        peer = llamacpp_peer(binary, gguf, slots=c)
        with RunningServer(peer, out / f"llamacpp-np{c}.log") as server:
            server.warm_up()
            results.append(level(server, c, args, hf_dir, out))
    return results


# ---- report -----------------------------------------------------------------------------------
HEADER = (
    f"{'server':<9}{'conc':>5}{'ok':>8}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}"
    f"{'ITL p99':>9}{'out tok/s':>11}{'OSL':>7}{'dur s':>7}{'cpu s':>7}{'aiperf':>7}{'load':>6}"
    "  pie engine: steps, gen tok/step, step ms, wall ms/step"
)


def row(r: LevelResult) -> str:
    def ms(v: float) -> str:
        return "n/a" if math.isnan(v) else f"{v:.0f}"

    line = (
        f"{r.server:<9}{r.concurrency:>5}{f'{r.completed}/{r.requests}':>8}"
        f"{ms(r.ttft_p50_ms):>10}{ms(r.ttft_p99_ms):>10}{r.itl_p50_ms:>9.1f}{r.itl_p99_ms:>9.1f}"
        f"{r.out_tok_s:>11.1f}{r.osl_mean:>7.1f}{r.duration_s:>7.1f}{r.server_cpu_s:>7.1f}"
        f"{r.aiperf_cpu_s:>7.1f}{r.load_1m:>6.1f}"
    )
    if r.engine is not None:
        e = r.engine
        wall = 1000 * r.duration_s / e.steps if e.steps else float("nan")
        line += f"  {e.steps:.0f}, {e.generated_per_step:.1f}, {e.sampled_step_ms:.0f}, {wall:.0f}"
    if r.failure:
        line += f"  FAILED: {r.failure}"
    return line


def tok_s(results: list[LevelResult], server: str, c: int) -> float:
    for r in results:
        if r.server == server and r.concurrency == c:
            return r.out_tok_s
    return float("nan")


def ttft_p50(results: list[LevelResult], server: str, c: int) -> float:
    for r in results:
        if r.server == server and r.concurrency == c:
            return r.ttft_p50_ms
    return float("nan")


def ratio(a: float, b: float) -> str:
    return "n/a" if math.isnan(a) or math.isnan(b) or b == 0 else f"{a / b:.2f}"


def summary(results: list[LevelResult], prefill: PrefillResult | None) -> list[str]:
    lines = []
    pie_ttft, llama_ttft = ttft_p50(results, "pie", 1), ttft_p50(results, "llamacpp", 1)
    if prefill is not None:
        lines.append(
            f"bare prefill (engine, the {prefill.prompts} c=1 prompts, median "
            f"{prefill.tokens_p50:.0f} tokens with the chat template): p50 "
            f"{prefill.prefill_p50_ms:.0f} ms; pie TTFT p50 c=1 {pie_ttft:.0f} ms "
            f"({ratio(pie_ttft, prefill.prefill_p50_ms)}x prefill); llama-server TTFT p50 c=1 "
            f"{llama_ttft:.0f} ms (pie/llama-server {ratio(pie_ttft, llama_ttft)})"
        )
    for r in results:
        if r.failure or r.completed < r.requests:
            lines.append(
                f"note: {r.server} c={r.concurrency}: {r.completed} of {r.requests} requests "
                f"completed in the level's time ({r.failure or 'no errors'}); its tok/s counts "
                "only what completed"
            )
    p = {c: tok_s(results, "pie", c) for c in LEVELS}
    h = {c: tok_s(results, "hf", c) for c in LEVELS}
    ll = {c: tok_s(results, "llamacpp", c) for c in LEVELS}
    lines.append(
        f"serve_vs_hf c1={ratio(p[1], h[1])} c16={ratio(p[16], h[16])} c64={ratio(p[64], h[64])} "
        f"vs_llamacpp_c16={ratio(p[16], ll[16])} vs_llamacpp_c64={ratio(p[64], ll[64])}"
    )
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="levels 1 and 16, fewer requests")
    ap.add_argument("--only", action="append", choices=SERVERS, help="a server (repeatable)")
    ap.add_argument("--levels", help="comma-separated concurrencies (default 1,4,16,64)")
    ap.add_argument("--requests", type=int, help="requests per level (default max(8, 2c))")
    ap.add_argument(
        "--level-seconds",
        type=float,
        help="no new request after this many seconds of a level (default 240, quick 90)",
    )
    ap.add_argument("--isl-mean", type=int, default=256)
    ap.add_argument("--isl-sd", type=int, default=128)
    ap.add_argument("--osl", type=int, default=128)
    ap.add_argument("--seed", type=int, default=20251206)
    ap.add_argument(
        "--out", type=Path, help="artifacts folder (default ~/.cache/pie/bench-serve/…)"
    )
    ap.add_argument("--no-prefill", action="store_true", help="skip the bare-prefill timing")
    ap.add_argument(
        "--pie-arg", action="append", help="an argument for `pie serve` (repeatable: --config F)"
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every server and aiperf run this started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pie" / "bench-serve"
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    out: Path = args.out or cache / stamp
    out.mkdir(parents=True, exist_ok=True)
    if args.levels:
        levels = [int(c) for c in args.levels.split(",")]
    else:
        levels = list(QUICK_LEVELS if args.quick else LEVELS)
    servers = [s for s in SERVERS if not args.only or s in args.only]
    gguf = default_gguf()
    hf_dir = hf_folder(gguf, cache)
    print(f"[bench] {stamp} UTC; load average {os.getloadavg()}; artifacts in {out}", flush=True)
    print(HEADER, flush=True)

    results: list[LevelResult] = []
    prefill: PrefillResult | None = None
    for name in servers:
        if name == "pie":
            results += run_server(pie_peer(args.pie_arg or ()), levels, args, hf_dir, out)
        elif name == "hf":
            results += run_server(hf_peer(hf_dir), levels, args, hf_dir, out)
        else:
            results += run_llamacpp(levels, args, hf_dir, gguf, out)
        c1_inputs = out / name / "c1" / "inputs.json"
        if prefill is None and not args.no_prefill and c1_inputs.exists():
            prefill = bare_prefill(c1_inputs)  # the server is down: the engine has the CPUs

    print()
    print(HEADER)
    for r in results:
        print(row(r))
    lines = summary(results, prefill)
    record: dict[str, Any] = {
        "utc": stamp,
        "argv": sys.argv,
        "loadavg_end": os.getloadavg(),
        "levels": [r.as_dict() for r in results],
        "prefill": None if prefill is None else prefill.__dict__,
        "summary": lines,
    }
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"[bench] load average at the end {os.getloadavg()}; results.json in {out}")
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
