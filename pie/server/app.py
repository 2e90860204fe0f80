"""`create_app`: the server's one ASGI app: health, metrics, the client protocol's WebSocket,
the OpenAI-compatible API and the web page, behind admission (auth.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from pie.server import openai_api
from pie.server.auth import AdmissionMiddleware
from pie.server.live_stats import LiveStats
from pie.server.state import ServerState
from pie.server.ws import websocket_endpoint

WEB_ROOT = Path(__file__).resolve().parent / "web"  # the web page (index.html and its files)
EXPIRE_EVERY_S = 30.0


def create_app(state: ServerState) -> Starlette:
    live_stats = LiveStats(state)  # the web page's plots (sampled in _lifespan)
    routes: list[BaseRoute] = [
        Route("/health", _health),
        Route("/metrics", _metrics),
        Route("/api/stats", live_stats.response),
        WebSocketRoute("/ws", websocket_endpoint),
        *openai_api.routes(state),
    ]
    web_root = Path(state.config.web_root) if state.config.web_root else WEB_ROOT
    if (web_root / "index.html").is_file():
        routes.append(Mount("/", app=StaticFiles(directory=web_root, html=True)))
    else:
        routes.append(Route("/", _placeholder_page))
    middleware = [Middleware(AdmissionMiddleware, config=state.config)]
    if state.config.cors_origins:
        middleware.insert(
            0,
            Middleware(
                CORSMiddleware,
                allow_origins=state.config.cors_origins,
                allow_methods=["*"],
                allow_headers=["*"],
            ),
        )
    app = Starlette(routes=routes, middleware=middleware, lifespan=_lifespan)
    app.state.pie = state
    app.state.live_stats = live_stats
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    state: ServerState = app.state.pie
    tasks = [asyncio.create_task(_expire_detached(state))]
    tasks.append(asyncio.create_task(app.state.live_stats.run()))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _expire_detached(state: ServerState) -> None:
    while True:
        await asyncio.sleep(EXPIRE_EVERY_S)
        state.channels.expire(state.config.detached_ttl_s)


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.pie
    return state


async def _health(request: Request) -> Response:
    state = _state(request)
    body: dict[str, Any] = {
        "status": "draining" if state.draining else "ok",
        "model": str(state.engine.model_name),
        "instances": len(state.runtime.instances()),
    }
    return JSONResponse(body, status_code=503 if state.draining else 200)


async def _metrics(request: Request) -> Response:
    state = _state(request)
    state.metrics.refresh(state.runtime, state.draining)
    state.metrics.openai_waiting.set(state.admission.waiting)
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def _placeholder_page(request: Request) -> Response:
    state = _state(request)
    return HTMLResponse(
        "<!doctype html><title>Pie</title><h1>Pie</h1>"
        f"<p>Serving {state.engine.model_name}. Clients: WebSocket protocol at <code>/ws</code> "
        "(docs/protocol.md), OpenAI API under <code>/v1</code>, metrics at "
        "<code>/metrics</code>.</p>"
    )
