"""One OpenAI request as one inferlet instance: the job it is launched with, the session its
events come back on, and the running tallies of each choice (part of the server's OpenAI API).

The built-in inferlet (`builtin/openai_generate.py`) gets the normalized job as its argument and
sends JSON events (see its docstring); this module is the handler's side of that exchange.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pie.runtime.errors import LaunchError, last_line
from pie.server.openai_schema import OpenAIError, Sampling
from pie.server.state import ServerDraining, ServerState

log = logging.getLogger(__name__)

BUILTIN_NAME = "openai"
BUILTIN_SOURCE = Path(__file__).resolve().parent / "builtin" / "openai_generate.py"

Entry = list[Any]  # [token, logprob, [[token, logprob], ...]] as the inferlet sends it


def register_builtin(state: ServerState) -> str:
    """Builds (cached by content) and registers the OpenAI inferlet; returns its hash."""
    return state.register_builtin(BUILTIN_NAME, BUILTIN_SOURCE)


@dataclass
class Job:
    """What the inferlet is launched with, plus what the handler keeps for the response."""

    prompts: list[list[int]]
    sampling: Sampling
    logprobs: int | None = None  # per generated token: top-n (0: the chosen token only)
    echo_logprobs: int | None = None  # per prompt token (completions with echo)
    stream: bool = False

    def argument(self) -> str:
        s = self.sampling
        return json.dumps(
            {
                "prompts": self.prompts,
                "n": s.n,
                "max_tokens": s.max_tokens,
                "temperature": s.temperature,
                "top_p": s.top_p,
                "stop": s.stop,
                "seed": s.seed,
                "logprobs": self.logprobs,
                "echo_logprobs": self.echo_logprobs,
                "stream": self.stream,
            },
            separators=(",", ":"),
        )

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def check_context(job: Job, max_position: int, vocab_size: int, prompt_param: str) -> None:
    """Refuses up front what cannot fit the model: 400 context_length_exceeded."""
    for prompt in job.prompts:
        outside = next((t for t in prompt if t >= vocab_size), None)
        if outside is not None:
            raise OpenAIError(
                400,
                f"{prompt_param}: token id {outside} is outside the vocabulary (size {vocab_size})",
                param=prompt_param,
                code="invalid_value",
            )
    longest = max(len(p) for p in job.prompts)
    wanted = job.sampling.max_tokens
    if wanted is None and longest < max_position:
        job.sampling.max_tokens = max_position - longest  # as much as fits
        return
    if wanted is None or longest + wanted > max_position:
        asked = f"{longest} in the prompt" + ("" if wanted is None else f", {wanted} to generate")
        raise OpenAIError(
            400,
            f"This model's maximum context length is {max_position} tokens. However, you "
            f"requested {longest + (wanted or 0)} tokens ({asked}). Please reduce the length "
            "of the prompt or of the completion.",
            param=prompt_param if wanted is None or longest >= max_position else "max_tokens",
            code="context_length_exceeded",
        )


class RequestSession:
    """The runtime `Session` of one request's instance: every send goes to an asyncio queue.

    Called from runtime threads; never blocks (hands off with `call_soon_threadsafe`).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[str | cf.Future[str]] = asyncio.Queue()

    def _put(self, item: str | cf.Future[str]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def send_text(self, instance_id: int, text: str) -> None:
        self._put(text)

    def send_blob(self, instance_id: int, data: bytes) -> None:
        log.warning("openai inferlet %d sent a blob; ignored", instance_id)

    def output(self, instance_id: int, stream: str, text: str) -> None:
        logging.getLogger(f"pie.inferlet.{instance_id}").info("[%s] %s", stream, text)

    def receive_text(self, instance_id: int) -> cf.Future[str]:
        return cf.Future()  # an HTTP request sends nothing after its body; never answered

    def receive_blob(self, instance_id: int) -> cf.Future[bytes]:
        return cf.Future()


@dataclass
class ChoiceTally:
    """What one choice has produced so far."""

    index: int
    text: list[str] = field(default_factory=list)
    logprobs: list[Entry] = field(default_factory=list)
    finish: str | None = None
    tokens: int = 0


class InferletRun:
    """A launched instance of the OpenAI inferlet and the events it sends."""

    def __init__(self, state: ServerState, job: Job) -> None:
        self.state = state
        self.job = job
        self.session = RequestSession(asyncio.get_running_loop())
        n = job.sampling.n
        self.choices = [ChoiceTally(i) for i in range(len(job.prompts) * n)]
        self.prompt_logprobs: list[list[Entry] | None] = [None] * len(job.prompts)
        try:
            program = register_builtin(state)
            # Its pages are governed by the admission line (openai_api.start), not the default
            # share of an inferlet: its quota is the pool.
            limits = dataclasses.replace(
                state.config.instance_limits(), kv_pages=state.admission.capacity
            )
            self.instance = state.launch(
                program, [job.argument()], self.session, source="openai", limits=limits
            )
        except ServerDraining as e:
            raise OpenAIError(503, str(e), type="server_error", code="server_draining") from None
        except LaunchError as e:
            raise OpenAIError(503, str(e), type="server_error", code="server_busy") from None
        self.instance.done.add_done_callback(self.session._put)

    def cancel(self, reason: str) -> None:
        if not self.instance.done.done():
            self.instance.cancel(reason)

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Each event as the inferlet sent it, tallied first; ends when the instance ends.

        Raises OpenAIError (500) when the instance failed.
        """
        while True:
            item = await self.session.queue.get()
            if isinstance(item, cf.Future):
                self._finish(item)
                return
            event = json.loads(item)
            self._tally(event)
            yield event

    def _tally(self, event: dict[str, Any]) -> None:
        if "prompt_lp" in event:
            self.prompt_logprobs[event["p"]] = event["prompt_lp"]
            return
        choice = self.choices[event["i"]]
        if "text" in event:
            choice.text.append(event["text"])
            choice.logprobs += event.get("lp") or []
        if "finish" in event:
            choice.finish = event["finish"]
            choice.tokens = int(event["tokens"])

    def _finish(self, done: cf.Future[str]) -> None:
        error: BaseException | None
        if done.cancelled():
            error = cf.CancelledError()
        else:
            error = done.exception()
        if error is not None:
            cause = last_line(error).removeprefix("pie.sdk._wit.PieError: ")
            # A pool run out by other programs is the server's state, not the request's fault.
            exhausted = "KV pool exhausted" in cause
            status, code = (503, "kv_pool_exhausted") if exhausted else (500, "inferlet_failed")
            self.state.metrics.errors.labels(f"openai_{code}").inc()
            raise OpenAIError(status, f"generation failed: {cause}", type="server_error", code=code)
        self.state.metrics.generated_tokens.inc(self.completion_tokens)

    async def collect(self, receive: Any = None) -> None:
        """Runs to the end; with `receive` (the ASGI one), a client that leaves cancels it."""
        watcher = asyncio.create_task(self._watch(receive)) if receive is not None else None
        try:
            async for _ in self.events():
                pass
        finally:
            if watcher is not None:
                watcher.cancel()
            self.cancel("the request ended")

    async def _watch(self, receive: Any) -> None:
        while True:
            message = await receive()
            if message.get("type") == "http.disconnect":
                self.cancel("the client disconnected")
                return

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)
