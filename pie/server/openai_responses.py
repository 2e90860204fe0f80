"""`POST /v1/responses`: text or messages in, one text message out, as a `response` object or
its stream of typed events (`response.created` ... `response.output_text.delta` ...
`response.completed`). Part of the server's OpenAI API; nothing is stored between requests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pie.server.openai_api import OpenAIAPI, endpoint
from pie.server.openai_format import message_item, new_id, now, output_text, response_object, sse
from pie.server.openai_run import InferletRun, Job
from pie.server.openai_schema import ResponsesRequest, parse_responses


@endpoint
async def responses_endpoint(api: OpenAIAPI, request: Request) -> Response:
    req = parse_responses(await api.read_body(request))
    api.check_model(req.model)
    prompt = api.chat_prompt(req.messages, "input")
    asked = req.sampling.max_tokens
    run = await api.start(Job([prompt], req.sampling, None, None, req.stream), "input")
    view = ResponseView(api, run, req, asked)
    if req.stream:
        return api.stream(run, view.frames())
    await run.collect(request.receive)
    return JSONResponse(view.object(view.status(), "".join(run.choices[0].text), True))


class ResponseView:
    """A run as the responses API shows it."""

    def __init__(
        self, api: OpenAIAPI, run: InferletRun, req: ResponsesRequest, asked: int | None
    ) -> None:
        self.api, self.run, self.req, self.asked = api, run, req, asked
        self.id, self.message_id, self.created = new_id("resp"), new_id("msg"), now()
        self.sequence = 0

    def status(self) -> str:
        return "incomplete" if self.run.choices[0].finish == "length" else "completed"

    def object(self, status: str, text: str | None, with_usage: bool) -> dict[str, Any]:
        counts = (self.run.job.prompt_tokens, self.run.completion_tokens) if with_usage else None
        return response_object(
            self.id,
            self.message_id,
            self.api.model_name,
            self.created,
            text,
            status,
            counts,
            self.asked,
            self.req.sampling,
        )

    def event(self, kind: str, **fields: Any) -> bytes:
        body = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse(body, event=kind)

    async def frames(self) -> AsyncIterator[bytes]:
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        yield self.event("response.created", response=self.object("in_progress", None, False))
        yield self.event("response.in_progress", response=self.object("in_progress", None, False))
        item = message_item(self.message_id, "", "in_progress")
        item["content"] = []
        yield self.event("response.output_item.added", output_index=0, item=item)
        yield self.event("response.content_part.added", **where, part=output_text(""))
        async for event in self.run.events():
            if event.get("text"):
                yield self.event(
                    "response.output_text.delta", **where, delta=event["text"], logprobs=[]
                )
        text = "".join(self.run.choices[0].text)
        status = self.status()
        yield self.event("response.output_text.done", **where, text=text, logprobs=[])
        yield self.event("response.content_part.done", **where, part=output_text(text))
        yield self.event(
            "response.output_item.done",
            output_index=0,
            item=message_item(self.message_id, text, status),
        )
        kind = "response.completed" if status == "completed" else "response.incomplete"
        yield self.event(kind, response=self.object(status, text, True))
