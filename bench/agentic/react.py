"""The `react` workload: a ReAct agent over the tool server, as an inferlet and as a client.

A task of `ios` I/Os is a session of `ios` questions asked one after another in one chat, each
answered with one lookup in the tool server's document set. The inferlet
(`inferlets/agent_react.py`) keeps the conversation in one context and calls the tools from
inside the server; the client twin sends the whole conversation to `/v1/chat/completions` at
every step and calls the tools itself with httpx, as an agent framework does. Both run the
inferlet's own `Agent` (prompts, parser, bookkeeping: loaded from its file), greedy, with the
same `MAX_TOKENS` and no stop strings (the model ends its turn with its end-of-turn token), so
their answers are equal wherever the engine's greedy tokens are.
"""

from __future__ import annotations

import runpy
from collections.abc import Awaitable, Callable
from functools import cache
from pathlib import Path
from typing import Any

import httpx
from openai import AsyncOpenAI

from bench.agentic.workload import Setting, TaskResult, agent_result

ROOT = Path(__file__).resolve().parents[2]
INFERLET = ROOT / "inferlets" / "agent_react.py"
TOOL_TIMEOUT_S = 10.0  # the inferlet's default too
STEPS_PER_QUESTION = 3  # a tool call and an answer, and one turn to spare
# (question, answer). SmolLM2 (greedy) looks up with one action per question, but its answer is
# often wrong (it repeats an earlier answer, or quotes another sentence of the document): 4 of 8
# answers right at 2 I/Os (tasks 0-3), 3 of 8 at 8 I/Os; equal both ways, which is what counts
QUESTIONS = [
    ("What is the capital of Zorbia?", "Quellen"),
    ("When was Quellen founded?", "1732"),
    ("What is the capital of Marovia?", "Tessel"),
    ("When was Tessel founded?", "1504"),
]


@cache
def agent_module(path: Path = INFERLET) -> dict[str, Any]:
    """The inferlet's prompts, parser and `Agent` (its SDK imports work on the host)."""
    return runpy.run_path(str(path), run_name="agent")


def questions_for(pool: list[tuple[str, str]], task: int, ios: int) -> list[str]:
    """Task `task`'s `ios` questions from a pool of (question, answer), each task from its own
    start in the pool."""
    return [pool[(task + i) % len(pool)][0] for i in range(ios)]


async def drive_client(
    agent: Any,
    max_tokens: int,
    client: AsyncOpenAI,
    model: str,
    act: Callable[[Any], Awaitable[str]],
) -> TaskResult:
    """Runs an inferlet's `Agent` from the client: the whole conversation each step."""
    while not agent.done:
        reply = await client.chat.completions.create(
            model=model, messages=agent.messages, max_tokens=max_tokens, temperature=0
        )
        call = agent.turn(reply.choices[0].message.content or "")
        if call is not None:
            agent.observe(await act(call))
    result = agent.result()
    return TaskResult(result["answer"], result["ios"], result["steps"])


class ReactWorkload:
    name = "react"
    inferlet = INFERLET

    def inferlet_args(self, task: int, setting: Setting, tools_url: str) -> list[str]:
        questions = questions_for(QUESTIONS, task, setting.ios)
        return [tools_url, "\n".join(questions), str(STEPS_PER_QUESTION * len(questions))]

    def parse_result(self, output: str) -> TaskResult:
        return agent_result(output)

    async def run_client(
        self, client: AsyncOpenAI, model: str, task: int, setting: Setting, tools_url: str
    ) -> TaskResult:
        shared = agent_module()
        questions = questions_for(QUESTIONS, task, setting.ios)
        agent = shared["Agent"](questions, STEPS_PER_QUESTION * len(questions))
        async with httpx.AsyncClient(timeout=TOOL_TIMEOUT_S) as http:

            async def act(call: tuple[str, str]) -> str:
                try:
                    reply = await http.get(shared["tool_request"](tools_url, *call))
                except httpx.HTTPError as e:  # as the inferlet: the model reads why
                    return f"error: {e}"
                return str(shared["observation"](reply.status_code, reply.text))

            return await drive_client(agent, shared["MAX_TOKENS"], client, model, act)


WORKLOAD = ReactWorkload()
