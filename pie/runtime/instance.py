"""`InferletInstance`: one run of a program, on its own thread, with its own store and limits.

Life: start → (wasm: store with memory limit, WASI without files or sockets, epoch deadline;
instantiate; call `run`) or (native: call the same SDK entry in-process) → whatever way it ends
(result, error, trap, limit, cancel) → cleanup drops every handle it held here → `on_end` (the
runtime, or the worker's link to it, then returns its pages in the control process). Guest
stdout/stderr go to files whose lines reach the instance's session, up to its output budget.
It runs wherever its `Sandbox` is: a worker process, or the control process itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import wasmtime
from wasmtime import component as wc

from pie.runtime.errors import InstanceFailed, last_line
from pie.runtime.host import futures as host_futures
from pie.runtime.host.state import InstanceHost, bind_current
from pie.runtime.wasm_bindings import TICK_SECONDS, set_deadline, watch_deadline

if TYPE_CHECKING:
    from pie.runtime.sandbox import Sandbox

log = logging.getLogger(__name__)

LOGGED_LINE_BYTES = 2000  # of a failure's last line in the log (the whole error goes to the client)


@dataclass(frozen=True, slots=True)
class Program:
    """A launchable program: a compiled component, a Python source (native mode), or both."""

    hash: str
    name: str
    component: wc.Component | None = None
    source: Path | None = None


class GuestLog:
    """Tails one guest's stdout or stderr file into the log, line by line.

    The files, not WASI's custom-output callbacks: those run on wasmtime's tokio threads and
    abort the process (a Rust panic) when one fires while the interpreter exits (measured:
    `pie run` of a printing program died 1 run in 3). Both streams of an instance draw on one
    budget (`InstanceLimits.max_output_bytes`, `spent` is shared): past it the rest is not
    logged, the file is cut back, and the instance is stopped, so a guest printing in a loop
    costs neither disk nor an unbounded log.
    """

    def __init__(self, path: Path, host: InstanceHost, stream: str, spent: list[int]) -> None:
        self.path = path
        self.host = host
        self.stream = stream
        self.spent = spent
        self.offset = 0
        self.partial = ""
        self._lock = threading.Lock()

    def pump(self, final: bool = False) -> None:
        with self._lock:
            try:
                size = os.stat(self.path).st_size
            except FileNotFoundError:
                return
            if size > self.offset:
                self._read(size)
            if final:
                if self.partial:
                    self._log([self.partial])
                    self.partial = ""
                self.path.unlink(missing_ok=True)

    def _read(self, size: int) -> None:
        budget = self.host.limits.max_output_bytes
        take = size - self.offset
        over = budget is not None and self.spent[0] + take > budget
        if over:
            assert budget is not None
            take = max(0, budget - self.spent[0])
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read(take)
        self.offset += len(data)
        self.spent[0] += len(data)
        *lines, self.partial = (self.partial + data.decode("utf-8", "replace")).split("\n")
        self._log(lines)
        if over:
            self.host.stop(f"output limit of {budget} bytes (stdout + stderr) reached")
            with contextlib.suppress(OSError):  # drop what was written past the budget
                os.truncate(self.path, self.offset)

    def _log(self, lines: list[str]) -> None:
        for line in lines:
            self.host.control.output(self.stream, line)


class InferletInstance:
    """A running (or finished) inferlet; `on_end(instance, result or InstanceFailed)` runs on
    its thread once it has ended and dropped what it held here."""

    def __init__(
        self,
        sandbox: Sandbox,
        program: Program,
        host: InstanceHost,
        *,
        native: bool,
        on_end: Callable[[InferletInstance, str | InstanceFailed], None],
    ) -> None:
        self.sandbox = sandbox
        self.program = program
        self.host = host
        self.id = host.id
        self.native = native
        self.on_end = on_end
        self.started_at = 0.0
        self.ended_at = 0.0
        self.ended = False
        self._store: wasmtime.Store | None = None  # the sandbox of a wasm run, while it runs
        self._thread = threading.Thread(target=self._main, name=f"inferlet-{self.id}", daemon=True)
        self.logs: list[GuestLog] = []  # the guest's stdout and stderr files, once it runs
        self._deadline_callback: object = None  # wasmtime calls it while the store lives

    # ---- control (any thread) ------------------------------------------------------------------
    def start(self) -> InferletInstance:
        self.started_at = time.monotonic()
        self.sandbox.running.add(self)
        self._thread.start()
        return self

    def cancel(self, reason: str = "cancelled") -> None:
        """Stops the instance: waits wake at once; the next host call, or for a guest computing
        without host calls the next epoch check (within ~50 ms), ends it."""
        self.host.stop(reason)

    # ---- the instance thread ---------------------------------------------------------------------
    def _main(self) -> None:
        bind_current(self.host)
        outcome: str | InstanceFailed
        try:
            outcome = self._run_native() if self.native else self._run_wasm()
        except InstanceFailed as e:
            outcome = _without_frames(e)
        except BaseException as e:  # a host bug: report it as this instance's failure only
            log.exception("instance %d crashed in the runtime", self.id)
            outcome = InstanceFailed(f"runtime error: {e!r}")
        finally:
            # The store goes now, whatever way the instance ended: its linear memory and its
            # two log descriptors must not wait for the garbage collector (measured: 512
            # failed instances kept 1,043 descriptors and 5.6 GB until a collection).
            self._store = None
            self._deadline_callback = None
            bind_current(None)
            try:
                self._cleanup()
            except Exception:  # never leave `done` unresolved
                log.exception("instance %d: cleanup failed", self.id)
            for guest_log in self.logs:
                guest_log.pump(final=True)
            self.ended_at = time.monotonic()
        outcome = _capped(outcome, self.host.limits.max_result_bytes)
        self.ended = True
        self.sandbox.running.discard(self)
        self.host.end_warnings()
        if isinstance(outcome, BaseException):
            self.host.log.info("failed: %s", cap_text(last_line(outcome), LOGGED_LINE_BYTES))
        try:
            self.on_end(self, outcome)
        except Exception:
            log.exception("instance %d: ending it failed", self.id)

    def _run_wasm(self) -> str:
        if self.program.component is None:
            raise InstanceFailed(f"program {self.program.name} has no component; build it first")
        try:
            # Instantiated ahead where it could be (a store with its limits and WASI, not run).
            prepared = self.sandbox.instantiate(self.program, self.host.limits.memory_bytes)
            store = self._store = prepared.store
            spent = [0]  # bytes of output logged, both streams
            self.logs = [
                GuestLog(prepared.stdout, self.host, "stdout", spent),
                GuestLog(prepared.stderr, self.host, "stderr", spent),
            ]
            set_deadline(store, self.host)
            self._deadline_callback = watch_deadline(store, self.host)
            if prepared.run is None:
                raise InstanceFailed(f"program {self.program.name} exports no `run` function")
            out = prepared.run(store, json.dumps(self.host.args))
        except wasmtime.WasmtimeError as e:  # a trapped store is poisoned: never called again
            # wasmtime's `enter_wasm` frame and the error it raised refer to each other; that
            # cycle holds this frame, and with it the store, until a collection: cut it.
            traceback.clear_frames(e.__traceback__)
            raise InstanceFailed(self._trap_message(e)) from None
        if out.tag == "ok":
            return str(out.payload)
        raise InstanceFailed(str(out.payload))

    def _run_native(self) -> str:
        from pie.runtime import native

        if self.program.source is None:
            raise InstanceFailed(
                f"program {self.program.name} has no Python source for native mode"
            )
        return native.run_source(self.program.source, self.host.args, self.host)

    def _trap_message(self, error: wasmtime.WasmtimeError) -> str:
        host = self.host
        text = str(error)
        if host.trap_reason:
            reason = host.trap_reason
        elif "interrupt" in text:
            if host.stopped.done():
                reason = host.stopped.result()
            elif host.wall_remaining() <= TICK_SECONDS * 2:
                reason = f"wall-time limit of {host.limits.wall_seconds} s reached"
            else:
                reason = f"CPU-time limit of {host.limits.cpu_seconds} s reached"
        elif "memory" in text and "minimum" in text:
            reason = (
                f"the component needs more memory than the limit of {host.limits.memory_bytes} "
                "bytes; raise the memory limit"
            )
        else:
            reason = f"trapped: {_trap_kind(text)}"
        return f"instance {self.id} ({self.program.name}) ended: {reason}"

    # ---- cleanup: whatever way the instance ended ----------------------------------------------
    def _cleanup(self) -> None:
        """Drops every handle; pending receives and pulls are withdrawn. Contexts, pages,
        subscriptions and children are the control process's to release (`on_end`)."""
        control = self.host.control
        for kind, obj in self.host.handles.drain():
            try:
                if kind == host_futures.KIND and obj.what in ("text", "blob", "generated"):
                    control.withdraw(obj.future)
            except Exception:
                log.exception("instance %d: releasing a %s failed", self.id, kind)


def _capped(outcome: str | InstanceFailed, limit: int) -> str | InstanceFailed:
    text = str(outcome)
    cut = cap_text(text, limit)
    if cut is text:
        return outcome
    return InstanceFailed(cut) if isinstance(outcome, InstanceFailed) else cut


def cap_text(text: str, limit: int) -> str:
    """`text` cut to its first `limit` bytes (UTF-8), saying how much was cut; `text` itself
    when it fits."""
    if len(text) <= limit // 4:  # no character takes more than 4 bytes: surely within
        return text
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return text
    head = data[:limit].decode("utf-8", "ignore")
    return f"{head} [... {len(data) - limit} more bytes cut; the limit is {limit} bytes]"


def _without_frames(error: InstanceFailed) -> InstanceFailed:
    """`error` cut from the frames it was raised through: its traceback (and the wasmtime
    error it replaced) would keep `_run_wasm`'s locals, the store among them, alive for as
    long as anyone holds the outcome."""
    error.__traceback__ = None
    error.__context__ = None
    error.__cause__ = None
    return error


def _trap_kind(text: str) -> str:
    """The informative line of a wasmtime error ("wasm trap: call stack exhausted")."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in lines:
        if "wasm trap:" in line:
            return line[line.index("wasm trap:") :]
    if "Caused by:" in lines:
        after = lines[lines.index("Caused by:") + 1 :]
        if after:
            return after[-1]
    return lines[0] if lines else "unknown trap"
