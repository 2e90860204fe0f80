"""Host side of the `poll` interface: wait on several futures, take their values, discard them."""

from __future__ import annotations

import concurrent.futures as cf

from pie.runtime.errors import HostError
from pie.runtime.host import futures
from pie.runtime.host.state import InstanceHost

MAX_WAIT = 65536  # futures in one wait-any call


def wait_any(host: InstanceHost, handles: list[int], timeout_ms: int | None) -> list[int]:
    """Positions in `handles` of the ready futures, after waiting for at least one (or timeout)."""
    if len(handles) > MAX_WAIT:
        raise HostError(f"wait-any over {len(handles)} futures; at most {MAX_WAIT} at once")
    # Each distinct id is looked up once: a list repeating one id costs what the list costs.
    entries = {h: host.handles.get(futures.KIND, h) for h in dict.fromkeys(handles)}
    ready = _ready(handles, entries)
    if ready or timeout_ms == 0:
        host.check_alive()
        return ready
    waits = [e.future for e in entries.values()]
    host.wait(waits, None if timeout_ms is None else timeout_ms / 1000)
    return _ready(handles, entries)


def _ready(handles: list[int], entries: dict[int, futures.HostFuture]) -> list[int]:
    done = {h for h, e in entries.items() if e.future.done()}
    return [i for i, h in enumerate(handles) if h in done]


def is_ready(host: InstanceHost, handle: int) -> bool:
    return bool(host.handles.get(futures.KIND, handle).future.done())


def take_text(host: InstanceHost, handle: int) -> str:
    return str(futures.take(host, handle, "text", "child"))


def take_blob(host: InstanceHost, handle: int) -> bytes:
    return bytes(futures.take(host, handle, "blob"))


def discard(host: InstanceHost, handle: int) -> None:
    """Frees a future; a pending receive or pull is withdrawn, a forward still runs."""
    entry = host.handles.pop(futures.KIND, handle)
    if entry.what in ("text", "blob", "generated"):
        host.control.withdraw(entry.future)  # the bus, session or generation forgets the waiter
    elif entry.what == "forward":
        entry.future.add_done_callback(lambda f: _log_failure(host, f))


def _log_failure(host: InstanceHost, future: cf.Future[object]) -> None:
    if not future.cancelled() and future.exception() is not None:
        host.warn("a discarded forward pass failed: %s", future.exception())
