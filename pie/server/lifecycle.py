"""Running and stopping the server: uvicorn on one socket, and the drain on SIGINT/SIGTERM.

Drain: no new launches (error frame `draining`, HTTP 503), running instances get
`drain_grace_s` to finish, the rest are cancelled and end with their pages returned, every
client gets its instances' last events, then the server stops and the runtime closes. A
second signal skips the rest of the grace period.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Iterator
from typing import Any

import uvicorn

from pie.server.state import ServerState

log = logging.getLogger("pie.server")
CANCEL_WAIT_S = 10.0  # how long cancelled instances get to release what they hold


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: a signal starts our drain instead."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket (port 0 picks a free one; the real port is then in the log)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def serve(state: ServerState, app: Any, sock: socket.socket) -> None:
    """Serves `app` on `sock` until SIGINT/SIGTERM, then drains; returns when all is done."""
    config = state.config
    server = _Server(
        uvicorn.Config(
            app,
            ws="websockets-sansio",  # the websockets library carries the protocol
            # Frames up to twice the protocol's limit reach the handler, which answers an error
            # frame; past that the WebSocket layer closes the connection (1009).
            ws_max_size=2 * config.max_frame_bytes,
            ws_ping_interval=20.0,
            log_level=config.log_level,
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    hurry = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: ending the grace period now", signal.Signals(signum).name)
            hurry.set()
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    waiting = asyncio.create_task(stop.wait())
    await asyncio.wait([serving, waiting], return_when=asyncio.FIRST_COMPLETED)
    if not serving.done():
        await drain(state, config.drain_grace_s, hurry)
        server.should_exit = True
    waiting.cancel()
    await serving
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(signum)


async def drain(state: ServerState, grace_s: float, hurry: asyncio.Event | None = None) -> int:
    """Stops launches, lets instances finish for `grace_s`, cancels the rest, sends every
    client its last events and closes the connections. Returns how many were cancelled."""
    state.draining = True
    runtime = state.runtime
    running = runtime.instances()
    log.info("draining: %d instances running, %.1f s grace", len(running), grace_s)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    hurry = hurry or asyncio.Event()
    while runtime.instances() and loop.time() < deadline and not hurry.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(hurry.wait(), 0.05)
    left = runtime.instances()
    for handle in left:
        channel = state.channels.get(handle.id)
        if channel is not None:  # the client then sees reason "cancelled"
            channel.cancel("the server is shutting down")
        else:
            handle.cancel("the server is shutting down")
    if left:
        log.info("draining: cancelled %d instances after the grace period", len(left))
        await asyncio.to_thread(cf.wait, [h.done for h in left], CANCEL_WAIT_S)
    # A done future's callbacks (which post the last event to this loop) run just after its
    # waiters wake: wait until every client's instance has had its last event delivered.
    settle = loop.time() + 2.0
    while loop.time() < settle and any(
        ch.handle is not None and ch.handle.done.done() and not ch.finished
        for ch in state.channels.all()
    ):
        await asyncio.sleep(0.01)
    connections = list(state.connections)
    await asyncio.gather(*(c.flush(2.0) for c in connections), return_exceptions=True)
    await asyncio.gather(*(c.close() for c in connections), return_exceptions=True)
    return len(left)


def pool_report(runtime: Any) -> tuple[bool, str]:
    """(whole, the final log line's words about the pool) after the runtime closed.

    Named exports outlive their exporters by design; at shutdown they are withdrawn first, so
    "whole" means no page leaked.
    """
    pool = runtime.pool
    exports = getattr(runtime, "exports", None)
    withdrawn = 0
    if exports is not None:
        for name in exports.list():
            exports.unexport(None, name)
            withdrawn += 1
    try:
        pool.check_integrity()
        consistent = True
    except Exception as e:  # reported, not raised: the process is exiting anyway
        print(f"pie serve: page pool integrity check failed: {e}", file=sys.stderr)
        consistent = False
    whole = consistent and pool.free_count == pool.num_pages
    words = f"{pool.free_count} of {pool.num_pages} KV pages free"
    if withdrawn:
        words += f" ({withdrawn} named exports withdrawn)"
    return whole, f"pool {'whole' if whole else 'NOT whole'}: {words}"
