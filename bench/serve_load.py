"""One load level of bench.serve: `aiperf profile` as a subprocess against a server's
`/v1/chat/completions` (streaming, synthetic prompts of mixed length), its JSON export parsed
into a `LevelResult`; plus pie's `/metrics` read before and after, to say where the time went.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

TIMING_RATE_PER_S = 50


class LoadError(RuntimeError):
    """aiperf is missing, failed, or left no export."""


@dataclass(frozen=True)
class LoadSpec:
    concurrency: int
    requests: int
    isl_mean: int = 256
    isl_sd: int = 128
    osl: int = 128
    seed: int = 20251206
    duration_s: float = 240.0  # aiperf issues no new request after this (first stop wins)
    grace_s: float = 60.0  # and waits this long for those in flight
    request_timeout_s: float = 600.0
    level_timeout_s: float = 900.0  # the whole aiperf run, startup included


@dataclass
class EngineDelta:
    """pie's /metrics over one level: engine steps and what they carried."""

    steps: float
    engine_tokens: float  # prompt + generated tokens through the engine
    generated_tokens: float
    sampled_step_ms: float  # mean of the step times the metrics poller sampled

    @property
    def generated_per_step(self) -> float:
        return self.generated_tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.engine_tokens / self.steps if self.steps else 0.0


@dataclass
class LevelResult:
    server: str
    concurrency: int
    requests: int
    completed: int = 0
    errors: int = 0
    ttft_p50_ms: float = float("nan")
    ttft_p99_ms: float = float("nan")
    itl_p50_ms: float = float("nan")
    itl_p99_ms: float = float("nan")
    out_tok_s: float = float("nan")
    osl_mean: float = float("nan")
    isl_mean: float = float("nan")
    duration_s: float = float("nan")
    wall_s: float = float("nan")  # aiperf's whole run, its own startup included
    aiperf_cpu_s: float = float("nan")  # CPU seconds aiperf's processes used over `wall_s`
    server_cpu_s: float = float("nan")  # CPU seconds the server's processes used over `wall_s`
    load_1m: float = float("nan")  # the machine's 1-minute load average as the level ended
    engine: EngineDelta | None = None
    failure: str | None = None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.engine is not None:
            d["engine"]["generated_per_step"] = self.engine.generated_per_step
            d["engine"]["tokens_per_step"] = self.engine.tokens_per_step
        return d


def aiperf_exe() -> str:
    exe = shutil.which("aiperf")
    if exe is None:
        raise LoadError("aiperf not found: pip install -e '.[bench]'")
    return exe


def aiperf_argv(
    url: str, model: str, tokenizer_dir: Path, spec: LoadSpec, extra: dict[str, Any], out: Path
) -> list[str]:
    return [
        aiperf_exe(), "profile",
        "--model", model, "--url", url, "--endpoint-type", "chat", "--streaming",
        "--tokenizer", str(tokenizer_dir),
        "--prompt-input-tokens-mean", str(spec.isl_mean),
        "--prompt-input-tokens-stddev", str(spec.isl_sd),
        "--prompt-output-tokens-mean", str(spec.osl),
        "--use-legacy-max-tokens",  # max_tokens: the one field all three servers read
        "--extra-inputs", json.dumps(extra),
        "--concurrency", str(spec.concurrency),
        # A request rate caps how often aiperf's timing loop wakes: in pure concurrency mode
        # it spins (yield, retry) whenever every slot is busy, a third to two thirds of a core
        # on this 2-core machine. A freed slot is refilled at the next tick, <= 1/RATE s later.
        "--request-rate", str(TIMING_RATE_PER_S), "--arrival-pattern", "constant",
        "--request-count", str(spec.requests),
        "--benchmark-duration", str(spec.duration_s),
        "--benchmark-grace-period", str(spec.grace_s),
        "--random-seed", str(spec.seed),
        "--request-timeout-seconds", str(spec.request_timeout_s),
        "--output-artifact-dir", str(out),
        "--ui-type", "none", "--no-server-metrics", "--no-gpu-telemetry",
    ]  # fmt: skip


def _stat(export: dict[str, Any], name: str, key: str) -> float:
    value = export.get(name, {}).get(key)
    return float(value) if value is not None else float("nan")


def parse_export(path: Path, server: str, spec: LoadSpec) -> LevelResult:
    export = json.loads(path.read_text())
    completed = int(export.get("request_count", {}).get("avg") or 0)  # successful requests
    finished = int(export.get("completed_request_count", {}).get("avg") or completed)
    errors = max(finished - completed, len(export.get("error_summary") or []))
    return LevelResult(
        server=server,
        concurrency=spec.concurrency,
        requests=spec.requests,
        completed=completed,
        errors=errors,
        ttft_p50_ms=_stat(export, "time_to_first_token", "p50"),
        ttft_p99_ms=_stat(export, "time_to_first_token", "p99"),
        itl_p50_ms=_stat(export, "inter_token_latency", "p50"),
        itl_p99_ms=_stat(export, "inter_token_latency", "p99"),
        out_tok_s=_stat(export, "output_token_throughput", "avg"),
        osl_mean=_stat(export, "output_sequence_length", "avg"),
        isl_mean=_stat(export, "input_sequence_length", "avg"),
        duration_s=_stat(export, "benchmark_duration", "avg"),
    )


def run_level(
    server: str,
    url: str,
    model: str,
    tokenizer_dir: Path,
    spec: LoadSpec,
    extra: dict[str, Any],
    out: Path,
    server_pid: int,
) -> LevelResult:
    """Runs aiperf once; a failed or timed-out level comes back with `failure` set."""
    out.mkdir(parents=True, exist_ok=True)
    argv = aiperf_argv(url, model, tokenizer_dir, spec, extra, out)
    (out / "command.txt").write_text(" ".join(argv) + "\n")
    began = time.monotonic()
    server_cpu_before = tree_cpu_s(server_pid)
    aiperf_cpu = CpuTally()
    with (out / "aiperf.stdout").open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        rc: int | str | None = None
        try:
            while rc is None:
                aiperf_cpu.sample(proc.pid)
                try:
                    rc = proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    if time.monotonic() - began > spec.level_timeout_s:
                        rc = f"timed out after {spec.level_timeout_s:.0f} s"
        finally:
            if proc.poll() is None:  # timed out, or this process is being stopped
                for p in reversed(_tree(proc.pid)):
                    with contextlib.suppress(psutil.Error):
                        p.kill()
                proc.wait()
    wall = time.monotonic() - began
    server_cpu = tree_cpu_s(server_pid) - server_cpu_before
    load_1m = os.getloadavg()[0]
    export = out / "profile_export_aiperf.json"
    if not export.exists():
        return LevelResult(
            server, spec.concurrency, spec.requests, wall_s=wall,
            failure=f"aiperf exited {rc} without an export; see {out / 'aiperf.stdout'}",
        )  # fmt: skip
    result = parse_export(export, server, spec)
    result.wall_s, result.aiperf_cpu_s, result.server_cpu_s = wall, aiperf_cpu.total, server_cpu
    result.load_1m = load_1m
    if rc != 0:
        result.failure = f"aiperf exited {rc}"
    elif result.errors:
        result.failure = f"{result.errors} requests failed"
    return result


# ---- CPU time of process trees (psutil comes with aiperf) ----------------------------------------
def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _cpu(p: psutil.Process) -> float:
    try:
        t = p.cpu_times()
        return float(t.user + t.system)
    except psutil.Error:
        return 0.0


def tree_cpu_s(pid: int) -> float:
    """CPU seconds used so far by a process and its live descendants."""
    return sum(_cpu(p) for p in _tree(pid))


class CpuTally:
    """CPU seconds of a process tree whose members come and go: each pid's last reading."""

    def __init__(self) -> None:
        self.last: dict[int, float] = {}

    def sample(self, pid: int) -> None:
        for p in _tree(pid):
            self.last[p.pid] = max(self.last.get(p.pid, 0.0), _cpu(p))

    @property
    def total(self) -> float:
        return sum(self.last.values())


# ---- pie's /metrics -------------------------------------------------------------------------------
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def metric_values(text: str) -> dict[str, float]:
    """Unlabelled samples (and labelled ones summed by name) of a Prometheus text page."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if m is None or line.startswith("#"):
            continue
        name, value = m.group(1), float(m.group(3))
        values[name] = values.get(name, 0.0) + value
    return values


def engine_delta(before: str | None, after: str | None) -> EngineDelta | None:
    if before is None or after is None:
        return None
    a, b = metric_values(before), metric_values(after)

    def d(name: str) -> float:
        return b.get(name, 0.0) - a.get(name, 0.0)

    samples = d("pie_step_seconds_count")
    return EngineDelta(
        steps=d("pie_engine_steps_total"),
        engine_tokens=d("pie_engine_tokens_total"),
        generated_tokens=d("pie_generated_tokens_total"),
        sampled_step_ms=1000 * d("pie_step_seconds_sum") / samples if samples else float("nan"),
    )
