"""The OpenAI-compatible HTTP API: `/v1/models`, `/v1/completions`, `/v1/chat/completions` and
`/v1/responses` (in openai_responses.py), each request served by its own instance of the
built-in inferlet (the same launch path every program takes). Mounted by `pie.server.app`.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from pie.server.openai_format import (
    TokenTexts,
    chat_logprobs,
    completion_logprobs,
    new_id,
    now,
    sse,
    usage,
)
from pie.server.openai_run import ChoiceTally, InferletRun, Job, check_context, register_builtin
from pie.server.openai_schema import OpenAIError, parse_chat, parse_completion
from pie.server.state import ServerState

log = logging.getLogger(__name__)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

Handler = Callable[["OpenAIAPI", Request], Awaitable[Response]]


def routes(state: ServerState) -> list[BaseRoute]:
    """The API's routes; builds and registers the built-in inferlet first (cached by content)."""
    register_builtin(state)
    from pie.server.openai_responses import responses_endpoint

    api = OpenAIAPI(state)
    return [
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", api.model, methods=["GET"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/responses", functools.partial(responses_endpoint, api), methods=["POST"]),
    ]


def endpoint(handler: Handler) -> Handler:
    """Turns OpenAIError (and anything unexpected) into an OpenAI-shaped error response."""

    @functools.wraps(handler)
    async def wrapped(api: OpenAIAPI, request: Request) -> Response:
        try:
            return await handler(api, request)
        except OpenAIError as e:
            return api.error_response(e)
        except Exception as e:  # a bug: say so in the body, keep the server up
            log.exception("OpenAI API handler failed")
            return api.error_response(
                OpenAIError(500, f"internal error: {e}", type="server_error", code="internal")
            )

    return wrapped


class OpenAIAPI:
    """The handlers, over one server's state."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.tokenizer = state.engine.tokenizer
        self.texts = TokenTexts(self.tokenizer)
        self.model_name = str(state.engine.model_name)
        self.max_position = int(state.engine.max_position)
        self.vocab_size = int(state.engine.vocab_size)

    # ---- shared pieces ------------------------------------------------------------------------------
    def error_response(self, error: OpenAIError) -> JSONResponse:
        self.state.metrics.errors.labels(f"openai_{error.code or error.type}").inc()
        return JSONResponse(error.body(), status_code=error.status)

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise OpenAIError(
                404,
                f"The model '{model}' does not exist; this server serves '{self.model_name}'",
                param="model",
                code="model_not_found",
            )

    async def read_body(self, request: Request) -> dict[str, Any]:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OpenAIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise OpenAIError(400, "the request body must be a JSON object")
        return body

    def chat_prompt(self, messages: list[dict[str, str]], param: str) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as e:  # the model's template refused the conversation
            raise OpenAIError(400, f"{param}: the chat template failed: {e}", param=param) from None
        return list(self.tokenizer.encode(text))

    async def start(self, job: Job, prompt_param: str) -> InferletRun:
        """Checks the job, waits in line for its KV room (see admission.py), launches it."""
        asked = job.sampling.max_tokens
        check_context(job, self.max_position, self.vocab_size, prompt_param)
        admission = self.state.admission
        pages = admission.pages_for([len(p) for p in job.prompts], job.sampling.n, asked)
        began = time.monotonic()
        await admission.acquire(pages)
        self.state.metrics.queue_wait.observe(time.monotonic() - began)
        try:
            run = InferletRun(self.state, job)
        except BaseException:
            admission.release(pages)
            raise
        run.instance.done.add_done_callback(lambda _: admission.release(pages))
        return run

    def stream(self, run: InferletRun, frames: AsyncIterator[bytes]) -> StreamingResponse:
        """An SSE response; a client that disconnects cancels the instance (pages return)."""

        async def body() -> AsyncIterator[bytes]:
            try:
                async for frame in frames:
                    yield frame
            except OpenAIError as e:  # after the headers went out: the error is an event
                self.state.metrics.errors.labels(f"openai_{e.code or e.type}").inc()
                yield sse(e.body())
            finally:
                run.cancel("the client disconnected")

        return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)

    # ---- /v1/models ---------------------------------------------------------------------------------
    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_name,
            "object": "model",
            "created": int(self.state.started_at),
            "owned_by": "pie",
            "max_model_len": self.max_position,
        }

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    @endpoint
    async def model(self, request: Request) -> Response:
        self.check_model(request.path_params["model_id"])
        return JSONResponse(self.model_card())

    # ---- /v1/completions ----------------------------------------------------------------------------
    @endpoint
    async def completions(self, request: Request) -> Response:
        req = parse_completion(await self.read_body(request))
        self.check_model(req.model)
        prompts = [self.tokenizer.encode(p) if isinstance(p, str) else p for p in req.prompts]
        if any(not p for p in prompts):
            raise OpenAIError(400, "prompt: a prompt has no tokens", param="prompt")
        echo_texts = [
            p if isinstance(p, str) else self.tokenizer.decode(ids)
            for p, ids in zip(req.prompts, prompts, strict=True)
        ]
        echo_lp = req.logprobs if req.echo else None
        job = Job(prompts, req.sampling, req.logprobs, echo_lp, req.stream)
        run = await self.start(job, "prompt")
        view = CompletionView(self, run, req.echo, echo_texts, req.logprobs)
        if req.stream:
            return self.stream(run, view.frames(req.include_usage))
        await run.collect(request.receive)
        return JSONResponse(view.response())

    # ---- /v1/chat/completions -----------------------------------------------------------------------
    @endpoint
    async def chat_completions(self, request: Request) -> Response:
        req = parse_chat(await self.read_body(request))
        self.check_model(req.model)
        prompt = self.chat_prompt(req.messages, "messages")
        k = req.top_logprobs if req.logprobs else None
        run = await self.start(Job([prompt], req.sampling, k, None, req.stream), "messages")
        view = ChatView(self, run, k)
        if req.stream:
            return self.stream(run, view.frames(req.include_usage))
        await run.collect(request.receive)
        return JSONResponse(view.response())


class CompletionView:
    """A run as the completions API shows it (one object, or chunks)."""

    def __init__(
        self,
        api: OpenAIAPI,
        run: InferletRun,
        echo: bool,
        echo_texts: list[str],
        logprobs: int | None,
    ) -> None:
        self.api, self.run, self.echo, self.echo_texts, self.k = (
            api,
            run,
            echo,
            echo_texts,
            logprobs,
        )
        self.id, self.created = new_id("cmpl"), now()
        self.offsets = [0] * len(run.choices)  # text_offset so far, per choice

    def _prompt(self, choice: ChoiceTally) -> int:
        return choice.index // self.run.job.sampling.n

    def _logprobs(self, choice: ChoiceTally, entries: list[Any], head: bool) -> dict[str, Any]:
        """Logprobs of `entries` (with the echoed prompt first when `head`)."""
        p = self._prompt(choice)
        first: list[int] = []
        if head:
            first = [self.run.job.prompts[p][0]]
            entries = (self.run.prompt_logprobs[p] or []) + entries
        out = completion_logprobs(
            entries, first, self.api.texts, self.offsets[choice.index], self.k or 0
        )
        if out["tokens"]:
            self.offsets[choice.index] = out["text_offset"][-1] + len(out["tokens"][-1])
        return out

    def response(self) -> dict[str, Any]:
        choices = []
        for c in self.run.choices:
            text = "".join(c.text)
            lp = None
            if self.k is not None:
                lp = self._logprobs(c, c.logprobs, head=self.echo)
            if self.echo:
                text = self.echo_texts[self._prompt(c)] + text
            choices.append(
                {"index": c.index, "text": text, "logprobs": lp, "finish_reason": c.finish}
            )
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.api.model_name,
            "choices": choices,
            "usage": usage(self.run.job.prompt_tokens, self.run.completion_tokens),
            "system_fingerprint": None,
        }

    def _chunk(self, index: int, text: str, lp: Any, finish: str | None) -> bytes:
        choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}
        return sse(
            {
                "id": self.id,
                "object": "text_completion",
                "created": self.created,
                "model": self.api.model_name,
                "choices": [choice],
            }
        )

    async def frames(self, include_usage: bool) -> AsyncIterator[bytes]:
        n = self.run.job.sampling.n
        if self.echo and self.k is None:
            for c in self.run.choices:
                yield self._chunk(c.index, self.echo_texts[self._prompt(c)], None, None)
        async for event in self.run.events():
            if "prompt_lp" in event:  # echo with logprobs: the prompt, for each of its choices
                p = event["p"]
                for c in self.run.choices[p * n : (p + 1) * n]:
                    yield self._chunk(
                        c.index, self.echo_texts[p], self._logprobs(c, [], True), None
                    )
                continue
            c = self.run.choices[event["i"]]
            if "text" in event:
                lp = None if self.k is None else self._logprobs(c, event.get("lp") or [], False)
                yield self._chunk(c.index, event["text"], lp, None)
            if "finish" in event:
                yield self._chunk(c.index, "", None, event["finish"])
        if include_usage:
            counts = usage(self.run.job.prompt_tokens, self.run.completion_tokens)
            yield sse(
                {
                    "id": self.id,
                    "object": "text_completion",
                    "created": self.created,
                    "model": self.api.model_name,
                    "choices": [],
                    "usage": counts,
                }
            )
        yield sse("[DONE]")


class ChatView:
    """A run as the chat completions API shows it (one object, or chunks)."""

    def __init__(self, api: OpenAIAPI, run: InferletRun, top_logprobs: int | None) -> None:
        self.api, self.run, self.k = api, run, top_logprobs
        self.id, self.created = new_id("chatcmpl"), now()
        self.stops = frozenset(api.tokenizer.stop_token_ids)

    def _logprobs(self, entries: list[Any]) -> dict[str, Any] | None:
        if self.k is None:
            return None
        shown = [e for e in entries if e[0] not in self.stops]  # the end-of-turn has no text
        return chat_logprobs(shown, self.api.texts, self.k)

    def _object(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.api.model_name,
            "system_fingerprint": None,
            "choices": choices,
        }

    def response(self) -> dict[str, Any]:
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": "".join(c.text), "refusal": None},
                "logprobs": self._logprobs(c.logprobs),
                "finish_reason": c.finish,
            }
            for c in self.run.choices
        ]
        body = self._object("chat.completion", choices)
        body["usage"] = usage(self.run.job.prompt_tokens, self.run.completion_tokens)
        return body

    def _chunk(self, choice: dict[str, Any], include_usage: bool) -> bytes:
        body = self._object("chat.completion.chunk", [choice])
        if include_usage:
            body["usage"] = None
        return sse(body)

    async def frames(self, include_usage: bool) -> AsyncIterator[bytes]:
        for c in self.run.choices:
            delta = {"role": "assistant", "content": ""}
            first = {"index": c.index, "delta": delta, "logprobs": None, "finish_reason": None}
            yield self._chunk(first, include_usage)
        async for event in self.run.events():
            i = event["i"]
            if "text" in event:
                lp = self._logprobs(event.get("lp") or [])
                if event["text"] or (lp and lp["content"]):
                    delta = {"content": event["text"]}
                    part = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": None}
                    yield self._chunk(part, include_usage)
            if "finish" in event:
                last = {"index": i, "delta": {}, "logprobs": None, "finish_reason": event["finish"]}
                yield self._chunk(last, include_usage)
        if include_usage:
            body = self._object("chat.completion.chunk", [])
            body["usage"] = usage(self.run.job.prompt_tokens, self.run.completion_tokens)
            yield sse(body)
        yield sse("[DONE]")
