"""`python -m bench.gpu`: the CUDA backend on an H100/H200 against its floor and HF transformers.

Models are Llama-shaped (1B: hidden 2048, 16 layers; 8B: hidden 4096, 32 layers) and Qwen3
0.6B-shaped, with seeded random weights (pie.engine.random_model) in bfloat16; HF's model holds
the very same tensors. Nothing is downloaded. Sections, each skipped when the time budget
(--budget-s) cannot cover it, and printed as it finishes:

  bs1     batch-1 greedy decode, ms/token (engine.execute per step, CUDA graphs, host sync
          included), against the floor: weight bytes / copy bandwidth. The bandwidth is a
          device-to-device copy of 1 GiB, bytes read + written per second, the best of 5.
          bs1_vs_floor = floor ms / measured ms (1.0 = at the floor).
  tput    N requests, fixed prompt and output lengths (no stop token), all submitted at once:
          our engine through pie.engine.generate.generate (continuous batching: chunked
          prefill under a token budget, decodes batched every step, CUDA graphs for plain
          decode steps) against HF's continuous batching (`generate_batch`'s manager) on the
          same weights in the same process. Output tok/s = N * output / wall time; total tok/s
          counts the prompts too. Setup (CUDA graph capture, HF's warm-up) is outside the
          clock on both sides. tput_vs_hf = geometric mean over the workloads of our output
          tok/s over HF's. A peer that overruns its deadline gives a bound ("<x tok/s").
  inferlet  the first tput workload through pie.runtime.Runtime, one inferlet instance per
          request (bench/gpu_inferlet.py, wasm; native where no component is at hand),
          against the engine driven directly: inferlet_overhead = time ratio - 1, in percent.
  qwen3   Official Pie's published workload: Qwen3-0.6B shape, 256 requests x 35 prompt +
          256 output tokens, all admitted at once; output tok/s.

--smoke runs every section's code on tiny shapes on the CPU (Triton's interpreter, float32)
in about a minute: it proves the harness, its numbers mean nothing and its last line starts
with "gpu-smoke". The last line of a GPU run:
    gpu bs1_vs_floor_1b=<x> bs1_vs_floor_8b=<x> tput_vs_hf_1b=<x> tput_vs_hf_8b=<x>
        inferlet_overhead=<pct> tput_qwen3_06b=<tok/s>
where a value that was not measured reads "n/a".
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from bench.engine import agreement

GREEDY_PAGE = 16


@dataclasses.dataclass(frozen=True)
class Workload:
    requests: int
    prompt: int
    output: int

    @property
    def label(self) -> str:
        return f"{self.requests}x{self.prompt}+{self.output}"


@dataclasses.dataclass(frozen=True)
class Plan:
    device: torch.device
    dtype: torch.dtype
    models: dict[str, str]  # role ("1b", "8b", "qwen3") -> random_model shape name
    bs1: Workload
    tput: tuple[Workload, ...]
    qwen3: Workload
    max_prefill_tokens: int
    graph_sizes: tuple[int, ...]
    bandwidth_bytes: int
    hf_cb_config: dict[str, Any]  # ContinuousBatchingConfig fields (empty: HF sizes itself)
    repeats: int = 3  # bs1 runs; the fastest counts
    warmup_tokens: int = 4  # a short generate before each timed one (0: none)


GPU_PLAN = Plan(
    device=torch.device("cuda"),
    dtype=torch.bfloat16,
    models={"1b": "llama-1b", "8b": "llama-8b", "qwen3": "qwen3-0.6b"},
    bs1=Workload(1, 128, 128),
    tput=(Workload(256, 512, 128), Workload(1024, 256, 256)),
    qwen3=Workload(256, 35, 256),
    max_prefill_tokens=8192,
    graph_sizes=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
    bandwidth_bytes=1 << 30,
    hf_cb_config={},
)
SMOKE_PLAN = Plan(
    device=torch.device("cpu"),
    dtype=torch.float32,  # CPU bf16 repacks weights, which an HF twin cannot share
    models={"1b": "tiny", "8b": "tiny", "qwen3": "tiny-qwen3"},
    bs1=Workload(1, 4, 3),  # the interpreter runs ~100 Triton programs a second: keep it tiny
    tput=(Workload(2, 6, 2), Workload(3, 3, 2)),
    qwen3=Workload(2, 4, 2),
    max_prefill_tokens=64,
    graph_sizes=(1, 2, 4),
    bandwidth_bytes=1 << 26,
    hf_cb_config={"num_blocks": 64, "max_batch_tokens": 128, "page_size": 16},
    repeats=1,
    warmup_tokens=0,
)


class Run(NamedTuple):
    seconds: float
    outputs: list[list[int]]
    complete: bool = True  # False: stopped at its deadline with only some requests done
    setup_s: float = 0.0  # outside the clock: HF's manager set-up and warm-up

    def output_tps(self, w: Workload) -> float:
        return sum(len(o) for o in self.outputs) / self.seconds

    def total_tps(self, w: Workload) -> float:
        done = sum(1 for o in self.outputs if len(o) == w.output)
        return (sum(len(o) for o in self.outputs) + done * w.prompt) / self.seconds


class Clock:
    """The run's time budget: sections ask it before they start."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.perf_counter()
        self.budget_s = budget_s

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- measurements ------------------------------------------------------------------------------
def copy_bandwidth(plan: Plan) -> float:
    """Bytes read + written per second by a device-to-device copy (best of 5)."""
    src = torch.ones(plan.bandwidth_bytes // 4, dtype=torch.float32, device=plan.device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(5):
        sync(plan.device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(plan.device)
        best = min(best, time.perf_counter() - start)
    return 2 * plan.bandwidth_bytes / best


def random_prompts(w: Workload, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (w.requests, w.prompt), generator=gen).tolist()


def build(plan: Plan, role: str, with_hf: bool) -> tuple[Any, Any]:
    """(our FusedLlamaModel, HF model on the same tensors or None) for `role`."""
    from pie.engine import random_model
    from pie.engine.cuda.fused_model import FusedLlamaModel

    built = random_model.build(plan.models[role], seed=0, device=plan.device, dtype=plan.dtype)
    model = FusedLlamaModel(built.config, built.weights, plan.device, plan.dtype)
    built.weights.clear()  # the model holds what it needs (q/k/v and gate/up fused, copied)
    if not with_hf:
        return model, None
    shared = dataclasses.replace(built, weights=random_model.weights_of(model))
    return model, random_model.hf_model(shared)


def make_engine(plan: Plan, model: Any, workloads: list[Workload]) -> Any:
    """Our engine with pages for every request of the largest workload, graphs installed."""
    from pie.engine import random_model
    from pie.engine.cuda import TritonAttention, cuda_graphs

    pages = max(w.requests * -(-(w.prompt + w.output) // GREEDY_PAGE) for w in workloads)
    engine = random_model.make_engine(
        model, num_pages=pages, page_size=GREEDY_PAGE, attention=TritonAttention()
    )
    context = max(w.prompt + w.output for w in workloads)
    most = max(w.requests for w in workloads)  # no bucket past the first that holds them all
    sizes = [b for i, b in enumerate(plan.graph_sizes) if i == 0 or plan.graph_sizes[i - 1] < most]
    cuda_graphs.install(engine, batch_sizes=sizes, max_context=context)
    return engine


def run_ours(engine: Any, plan: Plan, prompts: list[list[int]], w: Workload) -> Run:
    from pie.engine.generate import generate

    sync(plan.device)
    start = time.perf_counter()
    outputs = generate(engine, prompts, w.output, max_prefill_tokens=plan.max_prefill_tokens)
    sync(plan.device)
    return Run(time.perf_counter() - start, outputs)


def run_bs1(engine: Any, plan: Plan, prompt: list[int], new_tokens: int) -> float:
    """Seconds per decode step of one sequence: from its first token to its last."""
    from pie.engine.generate import generate

    stamps: list[float] = []
    generate(
        engine, [prompt], new_tokens, on_token=lambda _i, _t: stamps.append(time.perf_counter())
    )
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def run_hf(hf: Any, plan: Plan, prompts: list[list[int]], w: Workload, deadline_s: float) -> Run:
    """HF's continuous batching; the manager is set up (and warmed up) before the clock."""
    import inspect

    from transformers import GenerationConfig

    gen = GenerationConfig(
        max_new_tokens=w.output, do_sample=False, eos_token_id=-1, pad_token_id=0
    )  # eos -1: never stop early (None would fall back to the config's eos id)
    kwargs: dict[str, Any] = {"generation_config": gen, "block": True, "timeout": 30}
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        kwargs["continuous_batching_config"] = ContinuousBatchingConfig(**plan.hf_cb_config)
    except ImportError:
        pass
    try:
        from transformers.generation.continuous_batching.utils import WorkloadHints

        kwargs["workload_hints"] = WorkloadHints(
            max_prompt_length=w.prompt, max_generated_length=w.output, num_requests=w.requests
        )  # what generate_batch passes
    except ImportError:
        pass
    manager_cm = hf.continuous_batching_context_manager
    accepted = inspect.signature(manager_cm).parameters
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    results: dict[str, list[int]] = {}
    setup = time.perf_counter()
    with manager_cm(**kwargs) as manager:
        sync(plan.device)
        start = time.perf_counter()
        ids = manager.add_requests(inputs=prompts, max_new_tokens=w.output)
        while len(results) < len(ids) and time.perf_counter() - start < deadline_s:
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError("HF's continuous batching loop stopped")
                continue
            finished = getattr(result, "is_finished", None)
            if finished() if callable(finished) else "FINISHED" in str(result.status):
                results[result.request_id] = list(result.generated_tokens)
        seconds = time.perf_counter() - start
    outputs = [results[i] for i in ids if i in results]
    return Run(seconds, outputs, complete=len(outputs) == len(ids), setup_s=start - setup)


def run_inferlet(
    engine: Any, plan: Plan, prompts: list[list[int]], w: Workload, wasm: Path | None
) -> tuple[Run, str]:
    """The workload through the runtime, one instance per request; returns (run, mode)."""
    from pie.control.scheduler import BatchScheduler
    from pie.runtime.runtime import Runtime

    source = Path(__file__).with_name("gpu_inferlet.py")
    scheduler = BatchScheduler(
        engine, max_batch_tokens=plan.max_prefill_tokens, max_batch_sequences=w.requests
    )
    with Runtime(engine, scheduler=scheduler, max_instances=w.requests) as rt:
        if wasm is not None:
            name, native, mode = rt.add_component(wasm, name="bench"), False, "wasm"
        else:
            try:
                name, native, mode = rt.add_source(source), False, "wasm"
            except Exception as e:  # no componentize-py here: the same file, in-process
                print(f"# inferlet: no wasm build ({type(e).__name__}: {e}); running native")
                name, native, mode = rt.add_source(source, native=True), True, "native"
        args = [[str(w.output), ",".join(map(str, p))] for p in prompts]
        rt.run(name, [str(w.output), args[0][1]], native=native)  # warm: instantiate once
        sync(plan.device)
        start = time.perf_counter()
        instances = [rt.launch(name, a, native=native) for a in args]
        outputs = [json.loads(i.wait(600)) for i in instances]
        sync(plan.device)
        seconds = time.perf_counter() - start
        rt.pool.check_integrity()
    return Run(seconds, outputs), mode


# ---- report --------------------------------------------------------------------------------------
def environment(plan: Plan) -> dict[str, str]:
    import transformers
    import triton

    env = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if plan.device.type == "cuda":
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = str(torch.version.cuda)
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30,
            ).stdout.strip()  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            env["driver"] = "unknown"
    else:
        env["device"] = f"CPU ({platform.machine()}), Triton interpreter"
    return env


class Report:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []

    def add(self, section: str, **fields: Any) -> None:
        record = {"section": section, **fields}
        self.records.append(record)
        print(f"{section:9s} " + "  ".join(f"{k}={_fmt(v)}" for k, v in fields.items()), flush=True)
        if self.path is not None:
            self.path.write_text(json.dumps(self.records, indent=1))


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def section(
    report: Report, clock: Clock, name: str, needs_s: float, body: Callable[[], None]
) -> None:
    """Run `body` if the budget covers `needs_s`; a failure is reported, not fatal."""
    if clock.left() < needs_s:
        report.add(name, skipped=f"time budget ({clock.left():.0f} s left, needs ~{needs_s:.0f})")
        return
    try:
        body()
    except Exception as e:  # one broken section must not cost the others their numbers
        report.add(name, error=f"{type(e).__name__}: {e}"[:300])


# ---- the run -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (no GPU)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget")
    parser.add_argument(
        "--only", help="models to run, in order (default 1b,qwen3,8b; with --smoke 1b,qwen3)"
    )
    parser.add_argument("--no-hf", action="store_true", help="skip the HF peer")
    parser.add_argument("--inferlet-wasm", type=Path, help="a built bench/gpu_inferlet component")
    parser.add_argument("--json", type=Path, help="write every record here as it comes")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
        plan = SMOKE_PLAN
    elif not torch.cuda.is_available():
        print("bench.gpu needs a CUDA device (or --smoke)", file=sys.stderr)
        return 2
    else:
        plan = GPU_PLAN
    clock = Clock(args.budget_s)
    report = Report(args.json)
    env = environment(plan)
    print("# bench.gpu  " + "  ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    report.records.append({"section": "environment", **env})
    bandwidth = copy_bandwidth(plan)
    report.add("bandwidth", copy_gb_s=bandwidth / 1e9)
    final: dict[str, str] = {}
    only = args.only or ("1b,qwen3" if args.smoke else "1b,qwen3,8b")
    for role in [r.strip() for r in only.split(",") if r.strip()]:
        if role not in plan.models:
            parser.error(f"--only takes {', '.join(plan.models)}; got {role!r}")
        run_model(role, plan, args, clock, report, bandwidth, final)
        free_memory(plan.device)
    keys = ["bs1_vs_floor_1b", "bs1_vs_floor_8b", "tput_vs_hf_1b", "tput_vs_hf_8b"]
    keys += ["inferlet_overhead", "tput_qwen3_06b"]
    prefix = "gpu-smoke" if args.smoke else "gpu"
    print(prefix + " " + " ".join(f"{k}={final.get(k, 'n/a')}" for k in keys), flush=True)
    return 0


def run_model(
    role: str,
    plan: Plan,
    args: argparse.Namespace,
    clock: Clock,
    report: Report,
    bandwidth: float,
    final: dict[str, str],
) -> None:
    """Every section of one model. Each workload gets an engine (KV pages, CUDA graphs) of its
    own, freed before HF runs, so HF's cache can take the memory ours had."""
    scale = 4.0 if role == "8b" and not args.smoke else 1.0  # rough seconds multiplier
    if clock.left() < 20 * scale:
        report.add(role, skipped=f"time budget ({clock.left():.0f} s left)")
        return
    start = time.perf_counter()
    model, hf = build(plan, role, with_hf=role != "qwen3" and not args.no_hf)
    vocab = model.config.vocab_size
    report.add(role, shape=plan.models[role], setup_s=time.perf_counter() - start,
               weight_gb=model.weight_bytes() / 1e9)  # fmt: skip

    if role == "qwen3":

        def qwen3() -> None:
            w = plan.qwen3
            engine = make_engine(plan, model, [w])
            prompts = random_prompts(w, vocab, 3)
            generate_warmup(engine, plan, prompts)
            run = run_ours(engine, plan, prompts, w)
            assert all(len(o) == w.output for o in run.outputs), "a request stopped early"
            report.add("qwen3", workload=w.label, seconds=run.seconds,
                       output_tok_s=run.output_tps(w), total_tok_s=run.total_tps(w))  # fmt: skip
            final["tput_qwen3_06b"] = f"{run.output_tps(w):.0f}"

        section(report, clock, "qwen3", 15 * scale, qwen3)
        return

    def bs1() -> None:
        engine = make_engine(plan, model, [plan.bs1])
        prompt = random_prompts(plan.bs1, vocab, 1)[0]
        run_bs1(engine, plan, prompt, 2 + plan.warmup_tokens)  # kernels compiled, graph replayed
        step_s = min(run_bs1(engine, plan, prompt, plan.bs1.output) for _ in range(plan.repeats))
        floor_s = model.weight_bytes() / bandwidth
        report.add(f"bs1_{role}", ms_per_token=step_s * 1e3, floor_ms=floor_s * 1e3,
                   vs_floor=floor_s / step_s)  # fmt: skip
        final[f"bs1_vs_floor_{role}"] = f"{floor_s / step_s:.2f}"

    section(report, clock, f"bs1_{role}", 10 * scale, bs1)
    ratios: list[float] = []
    for k, w in enumerate(plan.tput):
        ratio = run_workload(role, k, w, model, hf, plan, args, clock, report, final)
        if ratio is not None:
            ratios.append(ratio)
    if len(ratios) == len(plan.tput):
        final[f"tput_vs_hf_{role}"] = f"{math.prod(ratios) ** (1 / len(ratios)):.2f}"


def run_workload(
    role: str,
    k: int,
    w: Workload,
    model: Any,
    hf: Any,
    plan: Plan,
    args: argparse.Namespace,
    clock: Clock,
    report: Report,
    final: dict[str, str],
) -> float | None:
    """One throughput workload: ours (then the inferlet path, for the first 1B workload), our
    engine freed, then HF. Returns our output tok/s over HF's, where both finished."""
    scale = 4.0 if role == "8b" and not args.smoke else 1.0
    prompts = random_prompts(w, model.config.vocab_size, 10 + k)
    ours: list[Run] = []

    def pie() -> None:
        engine = make_engine(plan, model, [w])
        generate_warmup(engine, plan, prompts)
        run = run_ours(engine, plan, prompts, w)
        assert all(len(o) == w.output for o in run.outputs), "a request stopped early"
        ours.append(run)
        report.add(f"tput_{role}", side="pie", workload=w.label, seconds=run.seconds,
                   output_tok_s=run.output_tps(w), total_tok_s=run.total_tps(w))  # fmt: skip
        if k == 0 and role == "1b":
            section(report, clock, "inferlet", 40, lambda: inferlet(engine, run))

    def inferlet(engine: Any, direct: Run) -> None:
        run, mode = run_inferlet(engine, plan, prompts, w, args.inferlet_wasm)
        overhead = (run.seconds / direct.seconds - 1) * 100
        report.add("inferlet", mode=mode, workload=w.label, seconds=run.seconds,
                   direct_s=direct.seconds, overhead_pct=overhead, output_tok_s=run.output_tps(w),
                   same_tokens=run.outputs == direct.outputs)  # fmt: skip
        final["inferlet_overhead"] = f"{overhead:.1f}%"

    section(report, clock, f"tput_{role}", 30 * scale, pie)
    free_memory(plan.device)  # our engine's pages go before HF sizes its cache
    if hf is None or not ours:
        return None
    ratios: list[float] = []

    def peer() -> None:
        # HF gets 8x our time (plus 30 s) at most: past that the ratio is a bound anyway
        deadline = max(10.0, min(clock.left() - 20, 8 * ours[0].seconds + 30))
        theirs = run_hf(hf, plan, prompts, w, deadline)
        mine = ours[0].output_tps(w)
        if theirs.complete:
            ratios.append(mine / theirs.output_tps(w))
            report.add(f"tput_{role}", side="hf", workload=w.label, seconds=theirs.seconds,
                       setup_s=theirs.setup_s, output_tok_s=theirs.output_tps(w),
                       total_tok_s=theirs.total_tps(w), pie_vs_hf=ratios[0],
                       greedy_agree=agreement(ours[0].outputs, theirs.outputs))  # fmt: skip
        elif not theirs.outputs:  # nothing at all: HF's loop failed, no rate to bound
            report.add(f"tput_{role}", side="hf", workload=w.label, seconds=theirs.seconds,
                       error="HF's continuous batching returned no request")  # fmt: skip
        else:  # HF's rate is below what finishing by the deadline would have taken
            bound = w.requests * w.output / theirs.seconds
            report.add(f"tput_{role}", side="hf", workload=w.label, seconds=theirs.seconds,
                       setup_s=theirs.setup_s, done=f"{len(theirs.outputs)}/{w.requests}",
                       output_tok_s=f"<{bound:.0f}", pie_vs_hf=f">{mine / bound:.2f}")  # fmt: skip

    section(report, clock, f"tput_{role}", 30 * scale, peer)
    free_memory(plan.device)
    return ratios[0] if ratios else None


def generate_warmup(engine: Any, plan: Plan, prompts: list[list[int]]) -> None:
    """A few requests through every step kind (prefill chunks, mixed, graphed decode)."""
    from pie.engine.generate import generate

    if plan.warmup_tokens:
        generate(
            engine, prompts[:8], plan.warmup_tokens, max_prefill_tokens=plan.max_prefill_tokens
        )


if __name__ == "__main__":
    sys.exit(main())
