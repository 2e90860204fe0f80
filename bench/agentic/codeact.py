"""The `codeact` workload: a CodeAct agent (it acts by writing Python), as an inferlet and as a
client.

A task of `ios` I/Os is a session of `ios` questions asked one after another in one chat, each
answered by running one snippet on the tool server's POST /run_python (a child interpreter
under limits). The inferlet (`inferlets/agent_codeact.py`) keeps the conversation in one
context; the client twin re-sends it to `/v1/chat/completions` every step and posts the code
itself. Both run the inferlet's own `Agent`, greedy, with the same `MAX_TOKENS` (see
`bench.agentic.react`, whose client loop this shares).
"""

from __future__ import annotations

import httpx
from openai import AsyncOpenAI

from bench.agentic.react import (
    ROOT,
    STEPS_PER_QUESTION,
    TOOL_TIMEOUT_S,
    agent_module,
    drive_client,
    questions_for,
)
from bench.agentic.workload import Setting, TaskResult, agent_result

INFERLET = ROOT / "inferlets" / "agent_codeact.py"
# (question, answer). SmolLM2 (greedy) answers each with one code run: 7 of 8 answers right at
# 2 I/Os (tasks 0-3), 6 of 8 at 8 I/Os ("the sum of 1 to 20" late in a chat: 100); equal both ways
QUESTIONS = [
    ("What is 2 to the power 20?", "1048576"),
    ("What is 7 to the power 4?", "2401"),
    ("What is 10 to the power 6?", "1000000"),
    ("What is the sum of the numbers from 1 to 20?", "210"),
]


class CodeactWorkload:
    name = "codeact"
    inferlet = INFERLET

    def inferlet_args(self, task: int, setting: Setting, tools_url: str) -> list[str]:
        questions = questions_for(QUESTIONS, task, setting.ios)
        return [tools_url, "\n".join(questions), str(STEPS_PER_QUESTION * len(questions))]

    def parse_result(self, output: str) -> TaskResult:
        return agent_result(output)

    async def run_client(
        self, client: AsyncOpenAI, model: str, task: int, setting: Setting, tools_url: str
    ) -> TaskResult:
        shared = agent_module(INFERLET)
        questions = questions_for(QUESTIONS, task, setting.ios)
        agent = shared["Agent"](questions, STEPS_PER_QUESTION * len(questions))
        async with httpx.AsyncClient(timeout=TOOL_TIMEOUT_S) as http:

            async def act(code: str) -> str:
                try:
                    reply = await http.post(shared["run_url"](tools_url), content=code.encode())
                except httpx.HTTPError as e:  # as the inferlet: the model reads why
                    return f"error: {e}"
                return str(shared["observation"](reply.status_code, reply.text))

            return await drive_client(agent, shared["MAX_TOKENS"], client, model, act)


WORKLOAD = CodeactWorkload()
