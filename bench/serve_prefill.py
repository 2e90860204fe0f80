"""The engine's bare prefill of bench.serve's concurrency-1 prompts: the floor that pie serve's
TTFT at concurrency 1 is judged against (no server, runtime or inferlet in between).

Each prompt is the chat request aiperf sent (its `inputs.json`), rendered with the chat template
and tokenized exactly as pie's OpenAI handler does, then timed as one `generate(..., 1)`:
prefill in one forward plus sampling the first token.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class PrefillResult:
    prompts: int
    tokens_p50: float  # prompt length (chat template included) of the median prompt
    prefill_p50_ms: float
    prefill_min_ms: float
    per_prompt: list[tuple[int, float]]  # (tokens, ms), in aiperf's order


def chat_messages(inputs_json: Path) -> list[list[dict[str, str]]]:
    """The messages of every request in an aiperf `inputs.json`, in order."""
    data = json.loads(inputs_json.read_text())
    out = []
    for session in data["data"]:
        for payload in session["payloads"]:
            out.append(payload["messages"])
    return out


def bare_prefill(inputs_json: Path, repeats: int = 3) -> PrefillResult:
    """Times each prompt's prefill `repeats` times (the fastest kept: other tenants of a shared
    machine only ever slow a run down) on a freshly loaded default engine."""
    from pie.engine.engine import Engine
    from pie.engine.generate import generate

    engine = Engine.load(None, num_pages=256)
    tok = engine.tokenizer
    prompts = [
        list(tok.encode(tok.apply_chat_template(m, add_generation_prompt=True)))
        for m in chat_messages(inputs_json)
    ]
    if not prompts:
        raise ValueError(f"{inputs_json} holds no requests")
    generate(engine, [prompts[0]], 1)  # warm-up: first-call setup is not prefill
    per_prompt = []
    for ids in prompts:
        best = float("inf")
        for _ in range(repeats):
            began = time.perf_counter()
            generate(engine, [ids], 1)
            best = min(best, time.perf_counter() - began)
        per_prompt.append((len(ids), 1000 * best))
    times = [ms for _, ms in per_prompt]
    return PrefillResult(
        prompts=len(prompts),
        tokens_p50=statistics.median(n for n, _ in per_prompt),
        prefill_p50_ms=statistics.median(times),
        prefill_min_ms=min(times),
        per_prompt=per_prompt,
    )
