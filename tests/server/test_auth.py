"""Admission: with no token only loopback clients get in (a request from this machine's
non-loopback address is refused, over HTTP and the WebSocket); with a token, every client
must present it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from pie.client import PieClient, ServerError
from pie.server import frames as f
from pie.server.auth import AdmissionMiddleware, admission_error, is_loopback
from pie.server.config import ServerConfig
from tests.server.conftest import ServerProcess, non_loopback_address, run

TOKEN = "s3cret-token"


def test_loopback_addresses() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.8.9.1", "::1", "::ffff:127.0.0.1"]))
    assert not any(map(is_loopback, ["10.0.0.2", "192.0.2.2", "::ffff:10.0.0.1", "", None]))
    assert not is_loopback("localhost")  # an ASGI peer is an address, never a name


def test_admission_rules() -> None:
    open_config, token_config = ServerConfig(), ServerConfig(token=TOKEN)
    assert admission_error(open_config, "127.0.0.1", None) is None
    refused = admission_error(open_config, "203.0.113.9", None)
    assert refused is not None and "only loopback" in refused and "--token" in refused
    assert admission_error(token_config, "203.0.113.9", TOKEN) is None
    assert "needs a token" in (admission_error(token_config, "127.0.0.1", None) or "")
    assert "wrong" in (admission_error(token_config, "127.0.0.1", "guess") or "")


def _asgi_status(config: ServerConfig, peer: str, headers: dict[str, str]) -> tuple[int, str]:
    inner = Starlette(routes=[Route("/v1/models", lambda r: PlainTextResponse("models"))])
    app = AdmissionMiddleware(inner, config)
    transport = httpx.ASGITransport(app=app, client=(peer, 40000))

    async def go() -> tuple[int, str]:
        async with httpx.AsyncClient(transport=transport, base_url="http://pie") as http:
            response = await http.get("/v1/models", headers=headers)
            return response.status_code, response.text

    return asyncio.run(go())


def test_middleware_refuses_a_non_loopback_request_without_a_token() -> None:
    assert _asgi_status(ServerConfig(), "127.0.0.1", {}) == (200, "models")
    status, body = _asgi_status(ServerConfig(), "198.51.100.7", {})
    assert status == 401 and "only loopback" in body and '"code": "unauthorized"' in body
    with_token = ServerConfig(token=TOKEN)
    assert _asgi_status(with_token, "198.51.100.7", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    assert _asgi_status(with_token, "127.0.0.1", {"Authorization": "Bearer nope"})[0] == 401


@pytest.mark.slow
def test_real_server_refuses_a_non_loopback_client(server: ServerProcess) -> None:
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no address besides loopback")
    base = f"http://{address}:{server.port}"
    metrics = httpx.get(base + "/metrics", timeout=10)
    assert metrics.status_code == 401 and "only loopback" in metrics.json()["error"]["message"]
    assert httpx.get(base + "/health", timeout=10).status_code == 200  # the probe stays open

    async def websocket() -> tuple[dict[str, object], int | None]:
        async with connect(f"ws://{address}:{server.port}/ws", compression=None) as ws:
            reply = msgspec.msgpack.decode(await ws.recv())
            with pytest.raises(ConnectionClosed) as closed:
                await ws.send(f.encode(f.Hello(id=1)))
                await ws.recv()
            return reply, closed.value.rcvd.code if closed.value.rcvd else None

    reply, code = run(websocket())
    assert reply["type"] == "error" and reply["code"] == "unauthorized"
    assert "only loopback" in str(reply["message"])
    assert code == 1008
    assert server.healthy()


@pytest.fixture(scope="module")
def token_server(
    server_cache: Path, monkeypatch_module: pytest.MonkeyPatch
) -> Iterator[ServerProcess]:
    monkeypatch_module.setenv("PIE_SERVE_TOKEN", TOKEN)  # the token stays off the command line
    proc = ServerProcess(server_cache)
    yield proc
    assert proc.stop() == 0, proc.log


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.mark.slow
def test_token_server_admits_only_the_token(token_server: ServerProcess) -> None:
    async def go() -> tuple[list[str], dict[str, object]]:
        codes = []
        for token in (None, "wrong"):
            with pytest.raises(ServerError) as refused:
                await PieClient.connect(token_server.url, token=token)
            codes.append(refused.value.code)
        async with PieClient.connect(token_server.url, token=TOKEN) as client:
            return codes, await client.info()

    codes, info = run(go())
    assert codes == ["unauthorized", "unauthorized"]
    assert info["model"] == "smollm2-135m-instruct"
    metrics = token_server.http + "/metrics"
    assert httpx.get(metrics, timeout=10).status_code == 401
    granted = httpx.get(metrics, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert granted.status_code == 200 and "pie_kv_pages_free" in granted.text
