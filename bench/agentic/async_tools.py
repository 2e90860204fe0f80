"""The `async_tools` workload: one tool call in flight while the model drafts, both ways.

The inferlet (`inferlets/async_tools.py`) starts its HTTP request and decodes a draft on its
context until the tool answers (at most `DRAFT_TOKENS`), then fills the observation into the same
context and answers. The client twin is as strong as a client can be: it starts the tool call
and, at the same time, streams the draft from `/v1/completions`, closing the stream when the
tool answers; then it sends the prompt, the draft and the observation again (token ids, encoded
piece by piece as the inferlet fills them) for the answer. The inferlet makes exactly one tool
call, so a task has one I/O whatever the sweep's `ios` (the harness says so). How much draft
fits in the tool's latency differs between the two ways, and the answer follows the draft: the
two ways' answers are equal only where their drafts are.
"""

from __future__ import annotations

import asyncio
import json
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from openai import AsyncOpenAI

from bench.agentic.workload import Setting, TaskResult
from pie.engine.loader import default_model_path
from pie.engine.tokenizer import Tokenizer

INFERLET = Path(__file__).resolve().parents[2] / "inferlets" / "async_tools.py"
# The inferlet's constants and text pieces (it has no importable prompt functions).
SYSTEM = "Think step by step, then answer."
DRAFT_TOKENS = 48
ANSWER_TOKENS = 32
OBSERVATION_CHARS = 2000
TOOL_TIMEOUT_S = 10.0
TASKS = [  # (what to look up, the question)
    ("Zorbia", "What is the capital of Zorbia?"),
    ("Marovia", "What is the main export of Marovia?"),
    ("Quellen", "When was Quellen founded?"),
    ("Tessel", "What is Tessel known for?"),
    ("Copper", "How much does a ton of copper sell for?"),
    ("Blue salt", "How much does a ton of blue salt sell for?"),
]


@cache
def tokenizer() -> Tokenizer:
    """The client's own copy of the model's tokenizer (a client renders its prompts itself)."""
    return Tokenizer.from_gguf(default_model_path())


def task_of(task: int) -> tuple[str, str]:
    return TASKS[task % len(TASKS)]


def tool_url(tools_url: str, topic: str) -> str:
    return f"{tools_url.rstrip('/')}/lookup?q={quote(topic, safe='')}"


class AsyncToolsWorkload:
    name = "async_tools"
    inferlet = INFERLET

    def inferlet_args(self, task: int, setting: Setting, tools_url: str) -> list[str]:
        topic, question = task_of(task)
        return [tool_url(tools_url, topic), question]

    def parse_result(self, output: str) -> TaskResult:
        data = json.loads(output)
        return TaskResult(str(data["answer"]), 1, 2)  # one call; a draft and an answer

    async def run_client(
        self, client: AsyncOpenAI, model: str, task: int, setting: Setting, tools_url: str
    ) -> TaskResult:
        topic, question = task_of(task)
        tok = tokenizer()
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        prompt = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
        async with httpx.AsyncClient(timeout=httpx.Timeout(TOOL_TIMEOUT_S)) as http:
            call = asyncio.ensure_future(http.get(tool_url(tools_url, topic)))
            draft = await self._draft(client, model, prompt, call)
            try:
                reply = await call
                seen = f"tool status {reply.status_code}: {reply.text[:OBSERVATION_CHARS]}"
            except httpx.HTTPError as e:
                seen = f"tool failed: {e}"
        full = prompt + tok.encode(draft) + tok.encode(f"\n[{seen}]\nAnswer:")
        answer = await client.completions.create(
            model=model, prompt=full, max_tokens=ANSWER_TOKENS, temperature=0
        )
        return TaskResult(answer.choices[0].text, 1, 2)

    @staticmethod
    async def _draft(
        client: AsyncOpenAI, model: str, prompt: list[int], call: asyncio.Future[httpx.Response]
    ) -> str:
        """Streams the draft until the tool call is done (or `DRAFT_TOKENS`)."""
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=DRAFT_TOKENS, temperature=0, stream=True
        )
        pieces: list[str] = []
        chunks = aiter(stream)
        try:
            while not call.done():  # the inferlet checks before each token; so does this
                following = asyncio.ensure_future(anext(chunks))
                racing: set[asyncio.Future[Any]] = {following, call}
                await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
                if not following.done():
                    following.cancel()
                    break
                try:
                    chunk = following.result()
                except StopAsyncIteration:
                    break
                pieces.append(chunk.choices[0].text if chunk.choices else "")
        finally:
            await stream.close()  # the server stops decoding a draft nobody reads
        return "".join(pieces)


WORKLOAD = AsyncToolsWorkload()
