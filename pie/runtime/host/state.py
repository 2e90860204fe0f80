"""`InstanceHost`: what the host knows about one running inferlet, where the inferlet runs.

Handle table, limits and their clocks, the cancel signal, the model and tokenizer, and the
instance's `ControlPort` to the control process (page pool, contexts, scheduler, message bus,
client session, children). The host modules receive it as their first argument.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pie.runtime.errors import InstanceTrap
from pie.runtime.host.control_port import ControlPort
from pie.runtime.host.handles import HandleTable
from pie.runtime.limits import InstanceLimits

if TYPE_CHECKING:
    from pie.runtime.workers.outbox import Outbox

WARNINGS_LOGGED = 10  # host warnings logged per instance; the rest are counted


class Session(Protocol):
    """The client side of one instance (a terminal, a WebSocket connection, a test).

    Lives in the control process; the runtime calls it from its own threads, so every method
    must be thread-safe and must not block.
    """

    def send_text(self, instance_id: int, text: str) -> None: ...
    def send_blob(self, instance_id: int, data: bytes) -> None: ...
    def receive_text(self, instance_id: int) -> cf.Future[str]: ...
    def receive_blob(self, instance_id: int) -> cf.Future[bytes]: ...
    def output(self, instance_id: int, stream: str, text: str) -> None:
        """A line the guest wrote to `stream` ("stdout" or "stderr"), without its newline."""
        ...


@dataclass(frozen=True)
class HostModel:
    """The model as the host side of an instance needs it: sizes and the tokenizer (which
    runs where the instance runs, so tokenizing scales with the workers)."""

    model_name: str
    vocab_size: int
    page_size: int
    max_position: int
    tokenizer: Any

    @classmethod
    def of(cls, engine: Any) -> HostModel:
        return cls(
            str(engine.model_name),
            int(engine.vocab_size),
            int(engine.page_size),
            int(engine.max_position),
            engine.tokenizer,
        )


@dataclass(frozen=True)
class HostServices:
    """What every instance of one process shares (one set per runtime or worker, no globals)."""

    model: HostModel
    version: str = "0.1.0"

    @property
    def model_names(self) -> list[str]:
        return [self.model.model_name]


@dataclass
class InstanceHost:
    """The host-side state of one inferlet instance."""

    id: int
    program: str
    args: list[str]
    services: HostServices
    control: ControlPort  # the control process, bound to this instance
    limits: InstanceLimits
    # In a worker process: the outbox its operations leave by (waits tell it when to send).
    gate: Outbox | None = None
    handles: HandleTable = field(init=False)
    log: logging.Logger = field(init=False)
    # Set (with the reason) to stop the instance: waits wake up and the next host call traps.
    stopped: cf.Future[str] = field(default_factory=cf.Future)
    started: float = field(default_factory=time.monotonic)
    waited: float = 0.0  # seconds spent blocked in host waits (not CPU time)
    # Why a host call trapped the instance (a limit, a cancel, a host fault), for its error.
    trap_reason: str | None = None
    # While blocked in `wait`: the futures it waits on (an answer to one of them wakes it).
    waiting_for: set[cf.Future[Any]] | None = None
    warnings: int = 0  # host warnings about this instance so far (`warn` logs the first few)

    def __post_init__(self) -> None:
        self.handles = HandleTable(self.limits.open_handles)
        self.log = logging.getLogger(f"pie.inferlet.{self.id}")

    def warn(self, message: str, *args: Any) -> None:
        """Logs a warning about the instance; past WARNINGS_LOGGED of them, only their count
        (`end_warnings`), so one program failing in a loop cannot flood the log."""
        self.warnings += 1
        if self.warnings <= WARNINGS_LOGGED:
            self.log.warning(message, *args)
        if self.warnings == WARNINGS_LOGGED:
            self.log.warning("further warnings about this instance are counted, not logged")

    def end_warnings(self) -> None:
        if self.warnings > WARNINGS_LOGGED:
            self.log.warning("%d more warnings not logged", self.warnings - WARNINGS_LOGGED)

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
        wall-time limit. In a worker, blocking is when the instance's queued operations leave.
        """
        bound = self.wall_remaining()
        if timeout is not None:
            bound = min(bound, timeout)
        waits = [*futures, self.stopped]
        began = time.monotonic()
        gate = self.gate
        unsent = False
        if gate is not None:
            self.waiting_for = set(futures)
            unsent = gate.blocking(self.id)
        try:
            while True:
                left = bound - (time.monotonic() - began)
                step = min(left, gate.gap_s) if gate is not None and unsent else left
                done, _ = cf.wait(
                    waits,
                    timeout=None if math.isinf(step) else max(step, 0.0),
                    return_when=cf.FIRST_COMPLETED,
                )
                if done or time.monotonic() - began >= bound:
                    break
                if gate is not None and unsent:  # the others took too long: send ours now
                    gate.flush()
                    unsent = False
        finally:
            self.waiting_for = None
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
