"""Admission: who may use the server. With a token configured, every client presents it (a
bearer header, or the `hello` frame's token); with none, only loopback clients are let in."""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from pie.server.config import ServerConfig

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

# HTTP paths that need admission: the APIs and metrics. The rest (the liveness probe, the web
# page's static files) anyone may read; the page's own API calls are admitted like any other.
PROTECTED_PREFIXES = ("/v1", "/metrics", "/api")


def protected(path: str) -> bool:
    """Whether `path` is under a protected prefix, whole segments only (`/api/stats` is,
    `/api.js` is not)."""
    return any(path == p or path.startswith(p + "/") for p in PROTECTED_PREFIXES)


def is_loopback(host: str | None) -> bool:
    """Whether `host` (an ASGI client address) is this machine (127.0.0.0/8, ::1, mapped)."""
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def admission_error(config: ServerConfig, peer_host: str | None, token: str | None) -> str | None:
    """Why this client may not in, or None when it may."""
    if config.token is None:
        if is_loopback(peer_host):
            return None
        return (
            f"client {peer_host} refused: this server has no token configured, so only loopback "
            "clients are admitted; start it with --token (or token in its config) and present "
            "the token as a bearer token"
        )
    if token is None:
        return "this server needs a token: send 'Authorization: Bearer <token>' (or token in hello)"
    if not hmac.compare_digest(token.encode(), config.token.encode()):
        return "the token presented is wrong"
    return None


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, if there is one."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def peer_host(scope: Scope) -> str | None:
    client = scope.get("client")
    return str(client[0]) if client else None


class AdmissionMiddleware:
    """Refuses HTTP requests that `admission_error` refuses, with 401 and an OpenAI-shaped
    error body. WebSocket connections are admitted by the connection handler (a browser cannot
    set headers on a WebSocket, so the token may also come in the hello frame)."""

    def __init__(
        self, app: Callable[[Scope, Receive, Send], Awaitable[None]], config: ServerConfig
    ):
        self.app = app
        self.config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        reason = admission_error(self.config, peer_host(scope), bearer_token(scope["headers"]))
        if reason is None:
            await self.app(scope, receive, send)
            return
        body = json.dumps(
            {"error": {"message": reason, "type": "authentication_error", "code": "unauthorized"}}
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})
