"""Host side of the `mcp` interface: the tools of the MCP servers an instance is granted.

The servers are named in the server's config (`mcp_servers`: a streamable-HTTP URL or a stdio
command) and travel in `InstanceLimits.mcp_servers`; a launch may narrow them. Each process
an instance runs in (a worker, or the control process for `--workers 0` and `--native`) holds
one client session per server, opened on first use by a task on this module's event-loop
thread and closed at shutdown (`close_all`, and at exit). Listing tools and calling one are
host futures the guest awaits while its contexts decode. Every operation, connecting included,
has a deadline: a server that hangs, dies, answers garbage or a 500 gives the guest an `err`,
never a hung instance; a session that failed is dropped, and the next call connects anew.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import shlex
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeGuard, TypeVar

from pie.runtime.errors import HostError
from pie.runtime.host import futures
from pie.runtime.host.state import InstanceHost

T = TypeVar("T")
CLOSE_TIMEOUT_S = 5.0  # how long shutdown waits for the sessions (and stdio servers) to close


@dataclass(frozen=True, slots=True)
class McpTool:
    name: str
    description: str
    input_schema: str  # JSON


@dataclass(frozen=True, slots=True)
class McpResult:
    text: str  # the text blocks of the result, joined by newlines
    data: str | None  # the structured result as JSON, where the tool gave one


def is_url(target: str) -> bool:
    return target.startswith(("http://", "https://"))


def describe(target: str) -> str:
    """A server's target for messages: its URL, or its command line."""
    return target if is_url(target) else f"`{target}`"


def grant(name: str, spec: object) -> tuple[str, str]:
    """(name, target) of a server named in a config or a flag. `spec`: a URL, a command line,
    or a table with `url = "http://..."` or `command = ["prog", "arg", ...]`; a ValueError says
    what is wrong."""
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(f"MCP server name {name!r}: use letters, digits, '-', '_' and '.'")
    if isinstance(spec, dict):
        if set(spec) == {"url"} and isinstance(spec["url"], str) and is_url(spec["url"]):
            return name, spec["url"]
        words = spec.get("command")
        if set(spec) == {"command"} and _words(words):
            return name, shlex.join(words)
    elif isinstance(spec, str) and spec.strip():
        return name, spec.strip()
    raise ValueError(
        f"MCP server {name!r}: give a url (http://...) or a command (a list of words), not {spec!r}"
    )


def _words(value: object) -> TypeGuard[list[str]]:
    return isinstance(value, list) and bool(value) and all(isinstance(w, str) for w in value)


def granted(host: InstanceHost) -> dict[str, str]:
    """The servers this instance may use: name -> target (URL or command line)."""
    return {str(name): str(target) for name, target in host.limits.mcp_servers}


def servers(host: InstanceHost) -> list[str]:
    return sorted(granted(host))


def list_tools(host: InstanceHost, server: str) -> int:
    target = _target(host, server)
    return _start(host, "mcp-tools", server, target, lambda s: s.tools())


def call_tool(
    host: InstanceHost, server: str, tool: str, arguments: str, timeout_s: float | None
) -> int:
    target = _target(host, server)
    if len(arguments) > host.limits.max_message_bytes:
        raise HostError(
            f"arguments of {len(arguments)} bytes; the limit is {host.limits.max_message_bytes}"
        )
    try:
        parsed = json.loads(arguments or "{}")
    except json.JSONDecodeError as e:
        raise HostError(f"the arguments of {tool!r} are not JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise HostError(f"the arguments of {tool!r} must be a JSON object, not {arguments[:80]!r}")
    return _start(host, "mcp-call", server, target, lambda s: s.call(tool, parsed), timeout_s)


def take_tools(host: InstanceHost, handle: int) -> list[McpTool]:
    tools: list[McpTool] = futures.take(host, handle, "mcp-tools")
    return tools


def take_result(host: InstanceHost, handle: int) -> McpResult:
    result: McpResult = futures.take(host, handle, "mcp-call")
    return result


def _target(host: InstanceHost, server: str) -> str:
    allowed = granted(host)
    if server not in allowed:
        raise HostError(
            f"MCP server {server!r} is not granted to this instance (it may use "
            f"{', '.join(sorted(allowed)) or 'no server'}); the server's mcp_servers config "
            "names the servers, and a launch may only narrow them"
        )
    return allowed[server]


def _start(
    host: InstanceHost,
    what: str,
    server: str,
    target: str,
    operation: Callable[[McpSession], Awaitable[T]],
    timeout_s: float | None = None,
) -> int:
    limits = host.limits
    running = sum(
        1
        for entry in host.handles.values(futures.KIND)
        if entry.what.startswith("mcp-") and not entry.future.done()
    )
    if running >= limits.mcp_in_flight:
        raise HostError(f"{running} MCP calls in flight; at most {limits.mcp_in_flight} at once")
    timeout = limits.mcp_timeout_s if timeout_s is None else min(timeout_s, limits.mcp_timeout_s)
    work = _with_session(server, target, operation, timeout)
    future = asyncio.run_coroutine_threadsafe(work, _loop())
    return futures.add(host, what, future)


async def _with_session(
    server: str, target: str, operation: Callable[[McpSession], Awaitable[T]], timeout: float
) -> T:
    session = _sessions.get(target)
    if session is None or session.failed:
        session = _sessions[target] = McpSession(server, target)
    try:
        async with asyncio.timeout(timeout):
            await session.connected()
            return await operation(session)
    except TimeoutError:
        if not session.ready.is_set():  # it never connected: the next call tries afresh
            session.drop()
        raise HostError(f"MCP server {server!r} did not answer within {timeout:g} s") from None
    except HostError:
        raise
    except Exception as e:  # the transport broke: this session is done
        session.drop()
        raise HostError(f"MCP server {server!r} ({describe(target)}) failed: {_cause(e)}") from None


class McpSession:
    """One server's client session, held open by a task on the loop thread (the `mcp`
    client's context must be entered and left by the same task)."""

    def __init__(self, server: str, target: str) -> None:
        self.server, self.target = server, target
        self.client: Any = None
        self.ready = asyncio.Event()  # set once connected, or once connecting failed
        self.failed: str | None = None
        self._closing = asyncio.Event()
        self._task = asyncio.create_task(self._hold())

    async def connected(self) -> None:
        await self.ready.wait()
        if self.failed is not None:
            raise HostError(self.failed)

    async def tools(self) -> list[McpTool]:
        listed, cursor = [], None
        while True:
            page = await self.client.list_tools(cursor=cursor)
            listed += [
                McpTool(t.name, t.description or "", json.dumps(t.input_schema)) for t in page.tools
            ]
            cursor = page.next_cursor
            if cursor is None:
                return listed

    async def call(self, tool: str, arguments: dict[str, Any]) -> McpResult:
        result = await self.client.call_tool(tool, arguments)
        text = "\n".join(b.text for b in result.content if getattr(b, "type", "") == "text")
        if result.is_error:
            raise HostError(f"tool {tool!r} of MCP server {self.server!r} failed: {text}")
        data = result.structured_content
        return McpResult(text, None if data is None else json.dumps(data))

    def drop(self) -> None:
        """Forgets this session and closes it (a new call opens another)."""
        if _sessions.get(self.target) is self:
            del _sessions[self.target]
        self.failed = self.failed or f"the session with MCP server {self.server!r} was closed"
        self._closing.set()
        if not self.ready.is_set():
            self._task.cancel()

    async def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(BaseException):
            await self._task

    async def _hold(self) -> None:
        from mcp import Client

        try:
            async with Client(_transport(self.target), mode="legacy") as client:
                self.client = client
                self.ready.set()
                await self._closing.wait()
        except BaseException as e:  # connecting failed, or the session broke while held
            self.failed = f"MCP server {self.server!r} ({describe(self.target)}): {_cause(e)}"
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            self.failed = self.failed or f"the session with MCP server {self.server!r} ended"
            self.ready.set()


def _transport(target: str) -> Any:
    """The `mcp` transport of a target: streamable HTTP for a URL, else a stdio subprocess
    (its stderr dropped: a chatty server must not fill the log of every instance)."""
    from mcp.client.stdio import StdioServerParameters, stdio_client
    from mcp.client.streamable_http import streamable_http_client

    if is_url(target):
        return streamable_http_client(target)
    argv = shlex.split(target)
    if not argv:
        raise HostError("an MCP server's command is empty")
    params = StdioServerParameters(command=argv[0], args=argv[1:])
    return stdio_client(params, errlog=_devnull())


def _cause(error: BaseException) -> str:
    """The innermost message of an error (anyio wraps transport failures in groups)."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


# ---- the process's event-loop thread and its sessions (target -> session) -----------------------
_sessions: dict[str, McpSession] = {}  # touched only on the loop thread
_state: dict[str, Any] = {}
_state_lock = threading.Lock()


def _loop() -> asyncio.AbstractEventLoop:
    with _state_lock:
        loop: asyncio.AbstractEventLoop | None = _state.get("loop")
        if loop is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=_serve, args=(loop,), name="pie-mcp", daemon=True).start()
            _state["loop"] = loop
            if not _state.get("atexit"):  # once per process, however often a loop restarts
                _state["atexit"] = atexit.register(close_all)
        return loop


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    # Importing the client takes a second or more: done here, before any call's deadline runs.
    import mcp.client.stdio
    import mcp.client.streamable_http  # noqa: F401

    loop.run_forever()


def _devnull() -> Any:
    with _state_lock:
        if "devnull" not in _state:  # open as long as the process: stdio servers write to it
            _state["devnull"] = open(os.devnull, "w")  # noqa: SIM115
        return _state["devnull"]


def close_all() -> None:
    """Closes every session of this process (stdio servers end with theirs); idempotent."""
    with _state_lock:
        loop = _state.pop("loop", None)
    if loop is None:
        return

    async def close() -> None:
        sessions = list(_sessions.values())
        _sessions.clear()
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)

    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(close(), loop).result(CLOSE_TIMEOUT_S)
    loop.call_soon_threadsafe(loop.stop)
