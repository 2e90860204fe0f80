"""`python -m bench.engine`: CPU decode speed of the engine against HF transformers' `generate`.

Drives the engine directly (`pie.engine.generate.generate`: no runtime, no control layer) and
HF's `generate` on the same GGUF weights, in one process and one run, so both see the same
machine. Results and method notes live in bench/RESULTS.md.

Method. Every prompt is `--prompt-len` tokens of English text (sequence b starts 3 tokens after
sequence b-1, so no two are alike and equal lengths need no padding) and every sequence makes
exactly `--new-tokens` tokens (no stop tokens; HF gets `min_new_tokens`). Both sides prefill the whole batch in one forward.
A clock marks the end of prefill — ours in `generate`'s `on_token` once every sequence has its
first token, HF's in a logits processor on its first call — so

    prefill = start -> first token of every sequence
    decode tok/s = batch * (new_tokens - 1) / (end - end of prefill)

Per batch size every contender runs `--repeats` times in turn after a short warm-up generate
(oneDNN builds kernels per shape), and the fastest decode of each is kept: other tenants of a
shared machine only ever slow a run down. The weight-read floor of one decode step is
`weight bytes / read bandwidth`, the bytes those a batch-1 step reads (a GGUF's Q4_1/Q8_0
blocks where the float32 kernels stream them, which decode to the same float32 weights), the
bandwidth measured at the start and the end of the run by summing a 1 GiB float32 buffer; the
faster of the two readings is used (the stricter floor).
"Greedy agree" is the mean common prefix of our greedy tokens and HF's, as a fraction.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from pie.engine.engine import Engine
from pie.engine.generate import generate
from pie.engine.loader import default_model_path

BATCHES = (1, 8, 32)


class Timing(NamedTuple):
    prefill_s: float
    decode_s: float
    decode_tokens: int
    outputs: list[list[int]]

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_s

    @property
    def step_s(self) -> float:
        """Seconds per decode step (one new token for every sequence)."""
        return self.decode_s / (self.decode_tokens / len(self.outputs))


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second `torch.sum` streams from memory over a buffer far larger than the caches."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    buf.sum()  # first touch: page faults are not bandwidth
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a brass "
    "lantern and a notebook in which he recorded the weather, the ships that passed, and the "
    "birds that rested on the gallery rail. In spring the storms came from the west and the "
    "sea turned the colour of slate; in summer the fog rolled in so thick that he rang the bell "
    "every thirty seconds until morning. Fishermen in the village below said he had not missed "
    "a single night in forty years. When the engineers arrived to install an electric beacon, "
    "they asked him what he would do with his evenings now. He thought about it for a long "
    "time, looking out at the grey water, and then he said that he would keep writing in the "
    "notebook, because somebody ought to remember what the sea had been like before the "
    "machines. The engineers laughed, but they left him the key to the tower, and for years "
    "afterwards travellers reported seeing a small light moving up the stairs at dusk, long "
    "after the great lamp at the top had begun to turn by itself. Children from the school "
    "would sometimes visit him on Saturdays to hear stories about shipwrecks, smugglers, and "
    "the winter when the harbour froze solid and the whole village walked across the ice to "
    "the island to bring him bread, candles, and a letter from his sister in the city."
)


def make_prompts(engine: Engine, batch: int, length: int) -> list[list[int]]:
    tokens = engine.tokenizer.encode(TEXT)
    while len(tokens) < 3 * batch + length:
        tokens = tokens + tokens
    return [tokens[3 * b : 3 * b + length] for b in range(batch)]


def run_engine(engine: Engine, prompts: list[list[int]], new_tokens: int) -> Timing:
    batch = len(prompts)
    emitted = 0
    prefill_done = 0.0

    def on_token(_index: int, _token: int) -> None:
        nonlocal emitted, prefill_done
        emitted += 1
        if emitted == batch:
            prefill_done = time.perf_counter()

    start = time.perf_counter()
    outputs = generate(
        engine,
        prompts,
        new_tokens,
        on_token=on_token,
        max_prefill_tokens=sum(len(p) for p in prompts),  # one prefill forward, as HF does
    )
    end = time.perf_counter()
    return Timing(prefill_done - start, end - prefill_done, batch * (new_tokens - 1), outputs)


def run_hf(model: Any, prompts: list[list[int]], new_tokens: int) -> Timing:
    import transformers

    class StepClock(transformers.LogitsProcessor):  # type: ignore[misc]
        """Called once per generated position, right after that step's forward."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            self.times.append(time.perf_counter())
            return scores

    clock = StepClock()
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            logits_processor=transformers.LogitsProcessorList([clock]),
            pad_token_id=0,
        )
    end = time.perf_counter()
    outputs = out[:, ids.shape[1] :].tolist()
    batch = len(prompts)
    return Timing(clock.times[0] - start, end - clock.times[0], batch * (new_tokens - 1), outputs)


def load_hf() -> Any:
    import transformers

    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    model.eval()
    return model


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> float:
    """Mean length of the common greedy prefix, as a fraction of our tokens generated (over the
    sequences `theirs` covers: a peer that timed out may have finished fewer)."""
    total = 0
    for a, b in zip(ours, theirs, strict=False):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        total += n
    return total / max(1, sum(len(a) for a in ours[: len(theirs)]))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def best(runs: list[Timing]) -> Timing:
    """The run with the fastest decode (other tenants of the machine only ever slow a run)."""
    return min(runs, key=lambda t: t.decode_s)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per configuration")
    parser.add_argument("--no-hf-float32", action="store_true", help="skip HF in float32")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        help="the engine's dtype (default: the engine's default for this CPU)",
    )
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    if args.new_tokens < 2 or args.repeats < 1:
        parser.error("--new-tokens must be at least 2 and --repeats at least 1")

    print(f"# bench.engine  {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"# machine: {machine()}", flush=True)
    pages = max(batches) * -(-(args.prompt_len + args.new_tokens) // 16)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    engine = Engine.load(None, num_pages=pages, page_size=16, dtype=dtype)
    dtype_name = str(engine.dtype).removeprefix("torch.")
    weight_bytes = engine.model.weight_bytes()
    prompts = {b: make_prompts(engine, b, args.prompt_len) for b in batches}
    hf = {"float32": load_hf()}
    if engine.dtype != torch.float32:
        hf[dtype_name] = copy.deepcopy(hf["float32"]).to(engine.dtype)
    if args.no_hf_float32 and dtype_name != "float32":
        del hf["float32"]
    bandwidths = [read_bandwidth()]

    # Per batch, every contender in turn, `repeats` times: noise from other tenants then falls
    # on all of them alike, and the best run of each is kept.
    ours: dict[int, Timing] = {}
    theirs: dict[str, dict[int, Timing]] = {name: {} for name in hf}
    for b in batches:
        generate(engine, prompts[b], 3, max_prefill_tokens=b * args.prompt_len)  # warm-up
        for model in hf.values():
            run_hf(model, prompts[b], 3)
        runs: dict[str, list[Timing]] = {name: [] for name in ["engine", *hf]}
        for _ in range(args.repeats):
            runs["engine"].append(run_engine(engine, prompts[b], args.new_tokens))
            for name, model in hf.items():
                runs[name].append(run_hf(model, prompts[b], args.new_tokens))
        ours[b] = best(runs["engine"])
        for name in hf:
            theirs[name][b] = best(runs[name])
        # a progress line per batch size: a run cut short still leaves its finished rows
        peers = "  ".join(f"HF {name} {theirs[name][b].decode_tps:.1f}" for name in hf)
        print(f"# bs{b}: engine {ours[b].decode_tps:.1f} tok/s  {peers}", flush=True)
    bandwidths.append(read_bandwidth())
    bandwidth = max(bandwidths)  # the faster reading gives the stricter floor
    floor_s = weight_bytes / bandwidth
    print(
        f"# engine dtype {dtype_name}; weights read per batch-1 step {weight_bytes / 1e6:.0f} MB; read "
        f"bandwidth {' / '.join(f'{bw / 1e9:.1f}' for bw in bandwidths)} GB/s (start / end); "
        f"floor {floor_s * 1e3:.2f} ms/step"
    )

    same = theirs[dtype_name]
    # HF in float32 is its own column only when the engine runs another dtype.
    f32 = theirs.get("float32") if dtype_name != "float32" else None
    header = (
        f"{'batch':>5} | {'engine prefill s':>16} {'decode tok/s':>12} {'ms/step':>8} | "
        f"{'HF ' + dtype_name + ' prefill s':>19} {'decode tok/s':>12} | "
        + (f"{'HF float32 prefill s':>20} {'decode tok/s':>12} | " if f32 else "")
        + f"{'x HF ' + dtype_name:>12} "
        + (f"{'x HF f32':>8} " if f32 else "")
        + f"| {'greedy agree ' + dtype_name:>21}"
        + (f" {'f32':>5}" if f32 else "")
    )
    print(header)
    print("-" * len(header))
    for b in batches:
        o, h = ours[b], same[b]
        f = f32[b] if f32 else None
        print(
            f"{b:>5} | {o.prefill_s:16.2f} {o.decode_tps:12.1f} {o.step_s * 1e3:8.2f} | "
            f"{h.prefill_s:19.2f} {h.decode_tps:12.1f} | "
            + (f"{f.prefill_s:20.2f} {f.decode_tps:12.1f} | " if f else "")
            + f"{o.decode_tps / h.decode_tps:12.2f} "
            + (f"{o.decode_tps / f.decode_tps:8.2f} " if f else "")
            + f"| {agreement(o.outputs, h.outputs):21.2f}"
            + (f" {agreement(o.outputs, f.outputs):5.2f}" if f else "")
        )
    if f32:  # how far rounding alone moves greedy tokens: HF against itself in float32
        agree = [agreement(same[b].outputs, f32[b].outputs) for b in batches]
        print(
            f"# greedy agree HF {dtype_name} with HF float32: "
            + " ".join(f"bs{b}={a:.2f}" for b, a in zip(batches, agree, strict=True))
        )
    f32_peer = theirs.get("float32")  # what HF's users get by default
    if f32_peer:
        ratios = " ".join(
            f"bs{b}={ours[b].decode_tps / f32_peer[b].decode_tps:.2f}" for b in batches
        )
        print(f"engine_vs_hf_float32 {ratios}")
    line = " ".join(f"bs{b}={ours[b].decode_tps / same[b].decode_tps:.2f}" for b in batches)
    if 1 in ours:
        line += f" bs1_floor={floor_s / ours[1].step_s:.2f}"
    print(f"engine_vs_hf {line}")


if __name__ == "__main__":
    main()
