"""The `agent_swarm` workload: researchers and a writer, as an inferlet and as a client program.

The inferlet (`inferlets/agent_swarm.py`) launches its researchers and writer as child
instances that pass the questions and notes through the message bus. The client twin does the
same steps through the server's OpenAI chat API, as an agent framework would: the same number
of researchers (asyncio tasks taking questions from one queue) each re-send their growing
conversation per turn and call the tool server themselves, then the writer's request. Prompts,
parser and turn formatting are the inferlet's own (loaded with `runpy`), so both ways answer the
same.
"""

from __future__ import annotations

import asyncio
import runpy
from pathlib import Path
from typing import Any

import httpx
from openai import AsyncOpenAI

from bench.agentic.workload import Setting, TaskResult, agent_result

INFERLET = Path(__file__).resolve().parents[2] / "inferlets" / "agent_swarm.py"
AGENT: dict[str, Any] = runpy.run_path(str(INFERLET), run_name="agent")
# Each answerable from the document its subject names (the tool server's `lookup`). A task
# needing N tool calls asks N of them from its own offset; questions repeat across agents (25 for
# 16 agents x 8), but each task's case line (`case_of`) keeps its conversations its own, so no
# agent replays another's whole conversation from the prefix cache (as different users' would).
QUESTIONS = [
    "What is the capital of Zorbia?",
    "What is the population of Zorbia?",
    "What is the main export of Zorbia?",
    "In which sea is Zorbia?",
    "What is the capital of Marovia?",
    "What is the population of Marovia?",
    "What is the main export of Marovia?",
    "Where is Marovia?",
    "How many residents does Quellen have?",
    "When was Quellen founded?",
    "What is Quellen known for?",
    "Which country has Quellen as its capital?",
    "How many residents does Tessel have?",
    "When was Tessel founded?",
    "What is Tessel known for?",
    "Which country has Tessel as its capital?",
    "What does a ton of blue salt sell for?",
    "Where is blue salt mined?",
    "How many tons of blue salt does Zorbia sell a year?",
    "What does a ton of copper from Marovia sell for?",
    "How many tons of copper does Marovia sell a year?",
    "How many glass bridges does Quellen have?",
    "When was the oldest glass bridge built?",
    "How many clock towers does Tessel have?",
    "How high is the tallest clock tower?",
]
MOST_RESEARCHERS = 4


def questions(task: int, ios: int) -> list[str]:
    return [QUESTIONS[(task * ios + k) % len(QUESTIONS)] for k in range(ios)]


def case_of(task: int) -> str:
    return f"c{task}"


def researchers(ios: int) -> int:
    return max(1, min(ios, MOST_RESEARCHERS))


async def chat(client: AsyncOpenAI, model: str, messages: list[dict[str, str]], limit: int) -> str:
    """One greedy model turn through `/v1/chat/completions` (the whole conversation re-sent)."""
    reply = await client.chat.completions.create(
        model=model,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=limit,
        temperature=0,
    )
    return reply.choices[0].message.content or ""


async def tool(http: httpx.AsyncClient, base_url: str, name: str, arg: str) -> str:
    """The inferlet's `call_tool`, from the client."""
    try:
        reply = await http.get(AGENT["tool_request"](base_url, name, arg))
        return str(AGENT["observation"](reply.status_code, reply.text))
    except httpx.HTTPError as e:  # no reply at all, as the inferlet's PieError
        return f"error: {e}"


async def research(
    client: AsyncOpenAI,
    model: str,
    http: httpx.AsyncClient,
    base_url: str,
    case: str,
    question: str,
) -> dict[str, Any]:
    """The inferlet's `research`: turns until a note, each one request."""
    messages = AGENT["research_messages"](case, question)
    note, ios, steps, errors = "Note: no answer found.", 0, 0, 0
    for _ in range(AGENT["RESEARCH_STEPS"]):
        text = await chat(client, model, messages, AGENT["RESEARCH_TOKENS"])
        steps += 1
        messages.append({"role": "assistant", "content": text})
        kind, name, arg = AGENT["parse_turn"](text)
        if kind == "note":
            note = f"Note: {arg}"
            break
        seen = "error: write an Action or a Note."
        if kind == "action":
            seen, ios = await tool(http, base_url, name, arg), ios + 1
        errors += seen.startswith("error:")
        messages.append({"role": "user", "content": f"Observation: {seen}" + AGENT["ASK_NOTE"]})
    return {"note": note, "ios": ios, "steps": steps, "tool_errors": errors}


class SwarmWorkload:
    name = "swarm"
    inferlet = INFERLET

    def inferlet_args(self, task: int, setting: Setting, tools_url: str) -> list[str]:
        asked = questions(task, setting.ios)
        return [tools_url, str(researchers(setting.ios)), case_of(task), *asked]

    def parse_result(self, output: str) -> TaskResult:
        return agent_result(output)

    async def run_client(
        self, client: AsyncOpenAI, model: str, task: int, setting: Setting, tools_url: str
    ) -> TaskResult:
        asked = questions(task, setting.ios)
        work: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        for item in enumerate(asked):
            work.put_nowait(item)
        reports: dict[int, dict[str, Any]] = {}
        timeout = httpx.Timeout(AGENT["TOOL_TIMEOUT_S"])
        async with httpx.AsyncClient(timeout=timeout) as http:

            async def researcher() -> None:
                while not work.empty():
                    i, question = work.get_nowait()
                    reports[i] = await research(
                        client, model, http, tools_url, case_of(task), question
                    )

            await asyncio.gather(*(researcher() for _ in range(researchers(setting.ios))))
        ordered = [reports[i] for i in range(len(asked))]
        notes = [r["note"] for r in ordered]
        messages = AGENT["writer_messages"](asked, notes)
        answer = await chat(client, model, messages, AGENT["WRITER_TOKENS"])
        ios = sum(r["ios"] for r in ordered)
        return TaskResult(answer.strip(), ios, sum(r["steps"] for r in ordered) + 1)


WORKLOAD = SwarmWorkload()
