"""`python -m bench.prefix_cache`: what automatic prefix caching saves on a repeated prompt.

A multi-turn chat through pie serve's OpenAI API (`/v1/chat/completions`, greedy, non-
streaming), as a client-driven agent loop sends it: a long system prompt, then each turn
re-sends the whole conversation so far plus one new question. The same conversation runs
against `pie serve` with the prefix cache (default) and with `--no-prefix-cache`, one server
after the other, in the same run. Per turn: wall time of the request and prompt length. Last
line `prefix_cache speedup=<total time without / with> hit_rate=<from /metrics>`; the answers
of both runs must be identical.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.serve_peers import RunningServer, http_json, http_text, pie_peer

SYSTEM = "You are a careful assistant for a travel agency. " + (
    "Answer in one short sentence, name the city, and never invent facts. " * 30
)
QUESTIONS = [
    "What is the capital of France?",
    "And of Italy?",
    "Which of the two is further south?",
    "Name a river in the first one.",
    "And one in the second.",
    "Which is longer?",
]


def conversation(url: str) -> tuple[list[float], list[int], list[str]]:
    messages = [{"role": "system", "content": SYSTEM}]
    times, prompts, answers = [], [], []
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        body = {"model": "smollm2-135m-instruct", "messages": messages, "max_tokens": 24}
        began = time.perf_counter()
        reply = http_json(url + "/v1/chat/completions", {**body, "temperature": 0}, timeout=300)
        times.append(time.perf_counter() - began)
        prompts.append(int(reply["usage"]["prompt_tokens"]))
        answer = reply["choices"][0]["message"]["content"]
        answers.append(answer)
        messages.append({"role": "assistant", "content": answer})
    return times, prompts, answers


def hit_rate(url: str) -> float:
    for line in http_text(url + "/metrics", timeout=30).splitlines():
        if line.startswith("pie_prefix_cache_hit_rate"):
            return float(line.split()[-1])
    return 0.0


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    runs = {}
    logs = Path(tempfile.mkdtemp(prefix="pie-bench-prefix-"))
    for label, extra in (("cached", ()), ("uncached", ("--no-prefix-cache",))):
        peer = pie_peer(extra)
        with RunningServer(peer, logs / f"{label}.log"):
            runs[label] = (*conversation(peer.url), hit_rate(peer.url))
    (t_on, prompts, a_on, rate), (t_off, _, a_off, _) = runs["cached"], runs["uncached"]
    print("turn  prompt tokens  cached s  uncached s")
    for i, (n, on, off) in enumerate(zip(prompts, t_on, t_off, strict=True), 1):
        print(f"{i:4d}  {n:13d}  {on:8.2f}  {off:10.2f}")
    assert a_on == a_off, "the cache changed an answer"
    print(f"prefix_cache speedup={sum(t_off) / sum(t_on):.2f} hit_rate={rate:.2f}")


if __name__ == "__main__":
    main()
