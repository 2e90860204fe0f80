"""`InstanceHost`: what the host knows about one running inferlet, and the services it may use.

Handle table, limits and their clocks, the cancel signal, the client session, and references
to the server's shared services (engine facade, page pool, contexts, scheduler, message bus,
child launcher). The host modules receive it as their first argument.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from pie.runtime.errors import InstanceTrap
from pie.runtime.host.handles import HandleTable
from pie.runtime.limits import InstanceLimits


class ChildHandle(Protocol):
    """What a parent holds of a child inferlet."""

    id: int
    done: cf.Future[str]

    def cancel(self, reason: str) -> None: ...


class Launcher(Protocol):
    def __call__(self, parent: InstanceHost, program: str, args: list[str]) -> ChildHandle: ...


class Session(Protocol):
    """The client side of one instance (a terminal, a WebSocket connection, a test)."""

    def send_text(self, instance_id: int, text: str) -> None: ...
    def send_blob(self, instance_id: int, data: bytes) -> None: ...
    def receive_text(self, instance_id: int) -> cf.Future[str]: ...
    def receive_blob(self, instance_id: int) -> cf.Future[bytes]: ...
    def output(self, instance_id: int, stream: str, text: str) -> None:
        """A line the guest wrote to `stream` ("stdout" or "stderr"), without its newline."""
        ...


@dataclass
class HostServices:
    """Server-wide objects shared by every instance (one set per runtime, no globals)."""

    engine: Any  # pie.engine.Engine or a stand-in with the same attributes and `tokenizer`
    pool: Any  # pie.control.page_pool.PagePool
    exports: Any  # pie.control.exports.ExportRegistry
    contexts: Any  # pie.control.context.ContextManager
    scheduler: Any  # pie.control.scheduler.BatchScheduler
    bus: Any  # pie.runtime.messaging.MessageBus
    launch: Launcher
    version: str = "0.1.0"

    @property
    def model_names(self) -> list[str]:
        return [str(self.engine.model_name)]


@dataclass
class InstanceHost:
    """The host-side state of one inferlet instance."""

    id: int
    program: str
    args: list[str]
    services: HostServices
    session: Session
    limits: InstanceLimits
    depth: int = 0
    handles: HandleTable = field(init=False)
    log: logging.Logger = field(init=False)
    # Set (with the reason) to stop the instance: waits wake up and the next host call traps.
    stopped: cf.Future[str] = field(default_factory=cf.Future)
    started: float = field(default_factory=time.monotonic)
    waited: float = 0.0  # seconds spent blocked in host waits (not CPU time)
    # Why a host call trapped the instance (a limit, a cancel, a host fault), for its error.
    trap_reason: str | None = None
    # Every child launched (discarding a child's future does not stop it; ending the parent does).
    children: list[ChildHandle] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.handles = HandleTable(self.limits.open_handles)
        self.log = logging.getLogger(f"pie.inferlet.{self.id}")

    # ---- limits -------------------------------------------------------------------------------
    def cpu_remaining(self) -> float:
        if self.limits.cpu_seconds is None:
            return math.inf
        used = time.monotonic() - self.started - self.waited
        return self.limits.cpu_seconds - used

    def wall_remaining(self) -> float:
        if self.limits.wall_seconds is None:
            return math.inf
        return self.limits.wall_seconds - (time.monotonic() - self.started)

    def check_alive(self) -> None:
        """Raises InstanceTrap if the instance was stopped or ran past a time limit."""
        if self.stopped.done():
            raise InstanceTrap(self.stopped.result())
        if self.wall_remaining() <= 0:
            raise InstanceTrap(f"wall-time limit of {self.limits.wall_seconds} s reached")
        if self.cpu_remaining() <= 0:
            raise InstanceTrap(f"CPU-time limit of {self.limits.cpu_seconds} s reached")

    def stop(self, reason: str) -> None:
        """Asks the instance to end (thread-safe); the first reason wins."""
        with contextlib.suppress(cf.InvalidStateError):
            self.stopped.set_result(reason)

    def wait(self, futures: list[cf.Future[Any]], timeout: float | None) -> set[cf.Future[Any]]:
        """Blocks until one of `futures` is done, `timeout` passes, or the instance is stopped.

        The time spent here is not CPU time. Raises InstanceTrap when stopped or past the
        wall-time limit.
        """
        bound = self.wall_remaining()
        if timeout is not None:
            bound = min(bound, timeout)
        began = time.monotonic()
        done, _ = cf.wait(
            [*futures, self.stopped],
            timeout=None if math.isinf(bound) else max(bound, 0.0),
            return_when=cf.FIRST_COMPLETED,
        )
        self.waited += time.monotonic() - began
        self.check_alive()
        return done


# ---- the instance a host call comes from ---------------------------------------------------------
# Each instance runs on its own thread, so the calling thread identifies the instance; both the
# wasm glue and native mode look the host state up here.
_current = threading.local()


def bind_current(host: InstanceHost | None) -> None:
    """Makes `host` the instance of the calling thread (None to unbind)."""
    _current.host = host


def current_host() -> InstanceHost | None:
    return getattr(_current, "host", None)
