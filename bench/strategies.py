"""`python -m bench.strategies`: strategy inferlets against their plain twins, in one run.

One process, the embedded SmolLM2 in float32 on the CPU (HF transformers runs the same GGUF
weights in float32), one runtime with the instances on threads of this process. Each
comparison does the same task both ways, `--repeats` times taking turns, and keeps each side's
best run (other tenants of a shared machine only ever slow a run down):

  speculative  `inferlets/speculative_ngram.py` on a repetitive editing task (rewrite a
               paragraph changing one word: the answer copies the prompt). The inferlet runs
               prompt-lookup speculation, then plain greedy decoding (the host's delegated loop,
               the fastest plain path) from a fork of the same prompt, and checks the tokens are
               identical; the engine's step log times each phase from its first forward to its
               last. Ratio: tokens/s over greedy's.
  beam         `inferlets/beam_search.py` against HF's `generate(num_beams=k)`, same width,
               length and prompt: wall time. Their rules differ (HF keeps k live beams and
               stops by its own heuristic), so the best beams are compared, not all of them.
  json         `inferlets/json_output.py` (a JSON Schema grammar masks the sampler on the host)
               against unconstrained generation that parses, checks the schema and retries in a
               fresh context (`bench/strategies_guest.py json-retry`), over several prompts:
               valid-output rate and total time.
  tot          `inferlets/tree_of_thought.py` against the same branches without forks
               (`bench/strategies_guest.py tot-fresh`: every branch, judge and answer prefills
               the prompt and path again in a fresh context): time, tokens the engine ran, and
               the most KV pages any one step's contexts held.

The last line is `strategies speculative=<x> beam=<x> json=<x> tot=<x>`, each the speedup over
the twin. Results, with machine and date: `bench/RESULTS.md`.
"""

from __future__ import annotations

import argparse
import json
import runpy
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.engine import load_hf, machine
from pie.engine.engine import Engine
from pie.runtime.runtime import Runtime

ROOT = Path(__file__).absolute().parent.parent
GUEST = Path(__file__).with_name("strategies_guest.py")
PROGRAMS = {
    "speculative_ngram": ROOT / "inferlets" / "speculative_ngram.py",
    "beam_search": ROOT / "inferlets" / "beam_search.py",
    "tree_of_thought": ROOT / "inferlets" / "tree_of_thought.py",
    "json_output": ROOT / "inferlets" / "json_output.py",
    "twin": GUEST,
}
PARAGRAPH = (
    "The river runs past the old mill at the edge of the village. In spring the river rises "
    "and the children watch it from the bridge; in summer the river is slow and warm, and the "
    "miller's dog sleeps on the bank. Every evening the river turns gold in the setting sun."
)
EDIT = f"Rewrite this paragraph, changing only 'river' to 'stream':\n\n{PARAGRAPH}"
JSON_PROMPTS = ["Describe a cat.", "Describe a dog.", "Describe a parrot.", "Describe a horse."]
TOT_PROBLEM = "How can I boil an egg without a pot?"


@dataclass(frozen=True)
class Step:
    """One engine step: when it ran, how many tokens, which KV pages its contexts hold."""

    start: float
    end: float
    tokens: int
    pages: frozenset[int]


class StepLog:
    """Records every `engine.execute` (the scheduler calls it once a step, on its thread)."""

    def __init__(self, engine: Engine) -> None:
        self.steps: list[Step] = []
        execute = engine.execute

        def timed(batch: Any) -> Any:
            start = time.perf_counter()
            result = execute(batch)
            pages = frozenset(p for s in batch.sequences for p in s.page_ids)
            tokens = sum(len(s.tokens) for s in batch.sequences)
            self.steps.append(Step(start, time.perf_counter(), tokens, pages))
            return result

        engine.execute = timed  # type: ignore[method-assign]

    def during(self, run: Callable[[], Any]) -> tuple[Any, list[Step], float]:
        """`run()`'s result, the steps it took and its wall time."""
        first = len(self.steps)
        start = time.perf_counter()
        result = run()
        return result, self.steps[first:], time.perf_counter() - start


def span(steps: list[Step]) -> float:
    return steps[-1].end - steps[0].start


# ---- the comparisons --------------------------------------------------------------------------
def speculative(rt: Runtime, log: StepLog, repeats: int, tokens: int) -> float:
    best_spec = best_greedy = 0.0
    step_ms = {"spec": float("inf"), "greedy": float("inf")}
    for _ in range(repeats):
        raw, steps, _ = log.during(lambda: rt.run("speculative_ngram", [str(tokens), EDIT]))
        out = json.loads(raw)
        assert out["equal_to_greedy"], "speculative decoding changed the tokens"
        n, spec, plain = len(out["tokens"]), out["forwards"], out["greedy_forwards"]
        # the step log: [prompt prefill] [spec forwards] [greedy forwards], one context a step
        phases = {"spec": steps[-plain - spec : -plain], "greedy": steps[-plain:]}
        best_spec = max(best_spec, n / span(phases["spec"]))
        best_greedy = max(best_greedy, n / span(phases["greedy"]))
        for name, phase in phases.items():  # the engine's own time per forward, median
            median = sorted(s.end - s.start for s in phase)[len(phase) // 2]
            step_ms[name] = min(step_ms[name], 1000 * median)
    # What bounds it: a forward of the queued token + draft costs step_ms["spec"], one plain
    # step step_ms["greedy"]; each forward yields n / spec tokens.
    ceiling = n / spec * step_ms["greedy"] / step_ms["spec"]
    print(
        f"speculative  {best_spec:.1f} tokens/s ({spec} forwards for {n} tokens)  "
        f"greedy {best_greedy:.1f} tokens/s ({plain} forwards)  identical tokens: yes  "
        f"speedup {best_spec / best_greedy:.2f}x\n"
        f"             engine time a forward: {step_ms['spec']:.1f} ms with a draft, "
        f"{step_ms['greedy']:.1f} ms for one token; {n / spec:.2f} tokens a forward, "
        f"so at most {ceiling:.2f}x"
    )
    return best_spec / best_greedy


def beam(rt: Runtime, hf: Any, repeats: int, width: int, tokens: int) -> float:
    prompt = "The capital of France is"
    ids = torch.tensor([rt.engine.tokenizer.encode(prompt)])
    ours_s = theirs_s = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        beams = json.loads(rt.run("beam_search", [str(width), str(tokens), prompt]))
        ours_s = min(ours_s, time.perf_counter() - start)
        start = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=width,
                num_return_sequences=width, max_new_tokens=tokens, do_sample=False,
                length_penalty=1.0, pad_token_id=0,
            )  # fmt: skip
        theirs_s = min(theirs_s, time.perf_counter() - start)
    stops = rt.engine.tokenizer.stop_token_ids
    theirs = out[0, ids.shape[1] :].tolist()
    theirs = theirs[: next((i + 1 for i, t in enumerate(theirs) if t in stops), len(theirs))]
    same = "yes" if beams[0]["tokens"] == theirs else "no"
    print(
        f"beam         width {width}, {tokens} tokens: inferlet {ours_s:.2f} s  "
        f"HF generate(num_beams={width}) {theirs_s:.2f} s  same best beam: {same}  "
        f"speedup {theirs_s / ours_s:.2f}x"
    )
    return theirs_s / ours_s


def json_output(rt: Runtime, repeats: int, tries: int) -> float:
    schema = json.dumps(runpy.run_path(str(PROGRAMS["json_output"]))["SCHEMA"])
    best = {"grammar": float("inf"), "retry": float("inf")}
    valid = {"grammar": 0, "retry": 0}
    attempts = 0
    for _ in range(repeats):
        valid = {"grammar": 0, "retry": 0}
        start = time.perf_counter()
        for prompt in JSON_PROMPTS:
            out = json.loads(rt.run("json_output", [prompt]))
            valid["grammar"] += bool(out["parsed"] and out["accepting"])
        best["grammar"] = min(best["grammar"], time.perf_counter() - start)
        start, attempts = time.perf_counter(), 0
        for prompt in JSON_PROMPTS:
            out = json.loads(rt.run("twin", ["json-retry", schema, str(tries), prompt]))
            valid["retry"] += out["valid"]
            attempts += out["tries"]
        best["retry"] = min(best["retry"], time.perf_counter() - start)
    n = len(JSON_PROMPTS)
    print(
        f"json         {n} prompts: grammar {valid['grammar']}/{n} valid in "
        f"{best['grammar']:.2f} s  parse-and-retry (up to {tries} tries) {valid['retry']}/{n} "
        f"valid in {best['retry']:.2f} s ({attempts} tries)  "
        f"speedup {best['retry'] / best['grammar']:.2f}x"
    )
    return best["retry"] / best["grammar"]


def tree_of_thought(rt: Runtime, log: StepLog, repeats: int) -> float:
    seen: dict[str, tuple[float, int, int, Any]] = {}
    for _ in range(repeats):
        for name, args in (
            ("tree_of_thought", [TOT_PROBLEM]),
            ("twin", ["tot-fresh", TOT_PROBLEM]),
        ):
            raw, steps, wall = log.during(lambda n=name, a=args: rt.run(n, a))  # type: ignore[misc]
            if name not in seen or wall < seen[name][0]:
                ran = sum(s.tokens for s in steps)
                seen[name] = (wall, ran, max(len(s.pages) for s in steps), json.loads(raw))
    forks, fresh = seen["tree_of_thought"], seen["twin"]
    same = sum(
        a[0] == b[0]
        for x, y in zip(forks[3]["levels"], fresh[3]["levels"], strict=True)
        for a, b in zip(x, y, strict=True)
    )
    print(
        f"tot          forks {forks[0]:.2f} s, {forks[1]} tokens run, at most {forks[2]} pages "
        f"in a step ({forks[3]['pages_shared']} shared, {forks[3]['pages_copied']} copied)  "
        f"fresh contexts {fresh[0]:.2f} s, {fresh[1]} tokens run, at most {fresh[2]} pages  "
        f"same thoughts {same}/6  speedup {fresh[0] / forks[0]:.2f}x"
    )
    return fresh[0] / forks[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=3, help="turns per comparison")
    parser.add_argument("--quick", action="store_true", help="shorter tasks, one repeat")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    print(f"machine: {machine()}")
    engine = Engine.load(None, dtype=torch.float32, num_pages=512)
    log = StepLog(engine)
    with Runtime(engine, workers=0) as rt:
        with ThreadPoolExecutor(2) as pool:  # builds are cached by content; each is a process
            present = [(name, path) for name, path in PROGRAMS.items() if path.exists()]
            list(pool.map(lambda item: rt.add_source(item[1], name=item[0]), present))
        rt.run("beam_search", ["2", "4"])  # kernels for the shapes, and each program's first
        rt.run("speculative_ngram", ["8", "Hi"])  # launch, untimed
        ratios = {
            "speculative": speculative(rt, log, repeats, 64 if args.quick else 128),
            "beam": beam(rt, load_hf().eval(), repeats, 4, 16 if args.quick else 32),
            "json": json_output(rt, repeats, 3) if rt.has_program("json_output") else None,
            "tot": tree_of_thought(rt, log, repeats),
        }
    print("strategies " + " ".join(f"{k}={v:.2f}" for k, v in ratios.items() if v is not None))


if __name__ == "__main__":
    main()
