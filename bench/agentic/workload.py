"""What one agent workload of `bench.agentic` provides: the same task run both ways.

Each workload names an inferlet (run inside `pie serve`, launched over the WebSocket protocol)
and a client twin that does the same steps through the same server's OpenAI API, the way an
agent framework drives vLLM or SGLang: it re-sends the growing conversation at every step and
calls the tools itself. Both use the same prompts, greedy decoding, the same parser of the
model's actions and the same tool server (`bench.agentic.tool_server`), so their answers should
be equal; the harness (`bench.agentic.harness`) runs both on the same tasks and compares.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from openai import AsyncOpenAI


@dataclass(frozen=True)
class Setting:
    """One point of the sweep."""

    ios: int  # tool calls (I/Os) each agent makes for its task
    tool_latency_s: float  # the tool server's delay per call
    agents: int  # agents running at once


@dataclass
class TaskResult:
    """What one agent reports when its task ends (either way)."""

    answer: str
    ios: int  # tool calls it actually made
    steps: int  # generation steps (model turns) it ran


def agent_result(output: str) -> TaskResult:
    """An agent inferlet's result JSON (`answer`, `ios`, `steps`, as the agents return it)."""
    data = json.loads(output)
    return TaskResult(str(data["answer"]), int(data["ios"]), int(data["steps"]))


class Workload(Protocol):
    name: str  # react, codeact, swarm, async_tools
    inferlet: Path  # its source, built by the harness

    def inferlet_args(self, task: int, setting: Setting, tools_url: str) -> list[str]:
        """The launch arguments that make the inferlet do task number `task` of `setting`."""
        ...

    def parse_result(self, output: str) -> TaskResult:
        """The inferlet's result text (its `run` return value) as a TaskResult."""
        ...

    async def run_client(
        self, client: AsyncOpenAI, model: str, task: int, setting: Setting, tools_url: str
    ) -> TaskResult:
        """The same task driven from the client through `/v1/chat/completions`."""
        ...
