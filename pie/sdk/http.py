"""Outgoing HTTP from an inferlet: `await fetch(url)`, to the hosts its launch allows.

Requests are asynchronous: several may be in flight (`asyncio.gather`) while the inferlet's
contexts decode. A status of 500 is a response; no response (a timeout, a refused connection,
a host not allowed, a body past the size cap) raises `PieError` with the reason.
"""

from __future__ import annotations

import json as jsonlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pie.sdk._wit import call, http
from pie.sdk.loop import wait_host


@dataclass(frozen=True)
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return jsonlib.loads(self.body)


def start(
    url: str,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    timeout: float | None = None,
) -> int:
    """Starts a request; returns its host future (`await response(future)`)."""
    request = http.Request(
        method,
        url,
        [http.Header(k, v) for k, v in (headers or {}).items()],
        bytes(body),
        None if timeout is None else max(0, int(timeout * 1000)),
    )
    return int(call(http.fetch, request))


async def response(future: int) -> Response:
    await wait_host(future)
    got = call(http.take_response, future)
    return Response(int(got.status), [(h.name, h.value) for h in got.headers], bytes(got.body))


async def fetch(
    url: str,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    json: Any = None,
    timeout: float | None = None,
) -> Response:
    """The response to one request; `json=` sends a JSON body (and its content type);
    `timeout` in seconds (at most the launch's limit)."""
    sent = dict(headers or {})
    if json is not None:
        body = jsonlib.dumps(json).encode()
        sent.setdefault("content-type", "application/json")
    return await response(
        start(url, method=method, headers=sent, body=body or b"", timeout=timeout)
    )
