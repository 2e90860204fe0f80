"""The control process's end of one worker: its process, its channel, the instances it runs,
and the dispatch of what it sends to the `ControlPlane`.

A receiver thread per worker decodes each frame and runs its operations in order: most inline
(they take the plane's locks for microseconds); those that wait for a context's forwards (fork,
truncate, export, close) and the release of an ended instance on the pool's plane thread, so one
worker's wait never holds up another's frames. Answers gather per worker and leave as one frame:
at the end of the frame being handled, or, for forward results, at the end of the engine step
(`WorkerPool.after_step`); answers made on any other thread leave at once.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import subprocess
import threading
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from pie.runtime.errors import InstanceFailed
from pie.runtime.plane.plane import WAITING_OPS, call
from pie.runtime.workers import frames
from pie.runtime.workers.channel import Channel, ChannelClosed
from pie.runtime.workers.frame_queue import FrameQueue

if TYPE_CHECKING:
    from pie.runtime.records import InstanceRecord
    from pie.runtime.workers.pool import WorkerPool

log = logging.getLogger(__name__)

_scope = threading.local()  # .dirty: connections with answers to flush when this thread is done


def _encode_value(op: str, value: Any) -> Any:
    if op == "generate_next":
        return frames.chunk_to_wire(value)
    return value


class WorkerConnection:
    def __init__(
        self, pool: WorkerPool, index: int, process: subprocess.Popen[bytes], channel: Channel
    ) -> None:
        self.pool = pool
        self.plane = pool.runtime.plane
        self.index = index
        self.process = process
        self.channel = channel
        self.instances: dict[int, InstanceRecord] = {}
        self.alive = True
        self._asks: dict[int, cf.Future[Any]] = {}  # req -> the plane's future, for Withdraw
        self._out = FrameQueue(channel)
        self.counters: cf.Future[dict[str, float]] | None = None
        self._thread = threading.Thread(
            target=self._receive, name=f"pie-worker-{index}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    # ---- sending --------------------------------------------------------------------------------
    def post(self, message: Any) -> None:
        """Queues a message to the worker; it leaves when the current batch of work ends."""
        self._out.add(message)
        if threading.current_thread() is self.pool.scheduler_thread:
            self.pool.dirty.add(self)  # flushed after the engine step
            return
        dirty = getattr(_scope, "dirty", None)
        if dirty is not None:
            dirty.add(self)
        else:
            self.flush()

    def flush(self) -> None:
        if self.alive:
            # A dead worker: its receiver notices and ends its instances.
            with contextlib.suppress(ChannelClosed):
                self._out.send()

    def _reply(self, req: int, op: str, future: cf.Future[Any]) -> None:
        """Posts `Done` for `future` (an Ask's or a Call's) when it resolves."""

        def done(f: cf.Future[Any]) -> None:
            self._asks.pop(req, None)
            if f.cancelled():
                self.post(frames.Done(req, False, "withdrawn"))
                return
            error = f.exception()
            if error is not None:
                self.post(frames.Done(req, False, _message(error)))
            else:
                self.post(frames.Done(req, True, _encode_value(op, f.result())))

        future.add_done_callback(done)

    # ---- receiving ------------------------------------------------------------------------------
    def _receive(self) -> None:
        while True:
            try:
                messages = frames.TO_CONTROL.decode(self.channel.recv())
            except ChannelClosed:
                break
            except Exception:
                log.exception("worker %d sent a frame that does not decode", self.index)
                break
            dirty: set[WorkerConnection] = set()
            _scope.dirty = dirty
            try:
                for message in messages:
                    try:
                        self._handle(message)
                    except Exception:
                        log.exception("worker %d: handling %r failed", self.index, message)
            finally:
                _scope.dirty = None
                for connection in dirty:
                    connection.flush()
        self.pool.worker_died(self)

    def _handle(self, message: Any) -> None:
        if isinstance(message, frames.Submit):
            passes = [(p.ctx, frames.call_from_wire(p)) for p in message.passes]
            futures = self.plane.submit(message.owner, passes)
            for p, future in zip(message.passes, futures, strict=True):
                future.add_done_callback(partial(self._forward_done, p.req))
        elif isinstance(message, frames.Tell):
            self._tell(message)
        elif isinstance(message, frames.Call):
            if message.op in WAITING_OPS:
                self.pool.plane_thread.submit(self._call, message)
            else:
                self._call(message)
        elif isinstance(message, frames.Ask):
            try:
                future = call(self.plane, message.op, message.owner, message.args)
            except Exception as e:
                self.post(frames.Done(message.req, False, _message(e)))
                return
            self._asks[message.req] = future
            self._reply(message.req, message.op, future)
        elif isinstance(message, frames.Withdraw):
            withdrawn = self._asks.pop(message.req, None)
            if withdrawn is not None:
                withdrawn.cancel()
        elif isinstance(message, frames.Ended):
            record = self.instances.pop(message.owner, None)
            if record is not None:
                outcome = message.text if message.ok else InstanceFailed(message.text)
                self.pool.plane_thread.submit(self.pool.runtime.instance_ended, record, outcome)
        elif isinstance(message, frames.Counters) and self.counters is not None:
            with contextlib.suppress(cf.InvalidStateError):
                self.counters.set_result(message.values)

    def _forward_done(self, req: int, future: cf.Future[Any]) -> None:
        if future.cancelled():
            self.post(frames.Done(req, False, "the forward pass was cancelled"))
            return
        error = future.exception()
        if error is not None:
            self.post(frames.Done(req, False, _message(error)))
        else:
            self.post(frames.Done(req, True, [frames.result_to_wire(r) for r in future.result()]))

    def _tell(self, message: frames.Tell) -> None:
        op, args = message.op, message.args
        run: Callable[[], Any]
        if op == "generate_many":
            runs = [(gen, ctx, frames.spec_from_wire(spec)) for gen, ctx, spec in args[0]]
            run = lambda: self.plane.generate_many(message.owner, runs)  # noqa: E731
        else:
            run = lambda: call(self.plane, op, message.owner, args)  # noqa: E731
        if op in WAITING_OPS:
            self.pool.plane_thread.submit(_logged, run, op)
        else:
            _logged(run, op)

    def _call(self, message: frames.Call) -> None:
        try:
            if message.op == "launch_child":
                program, args, result_req = message.args
                child, done = self.plane.launch_child(message.owner, program, args)
                self._reply(result_req, "child", done)
                value: Any = child
            else:
                value = call(self.plane, message.op, message.owner, message.args)
            self.post(frames.Done(message.req, True, value))
        except Exception as e:
            self.post(frames.Done(message.req, False, _message(e)))


def _message(error: BaseException) -> str:
    return str(error) or type(error).__name__


def _logged(run: Callable[[], Any], op: str) -> None:
    try:
        run()
    except Exception as e:
        # The instance gets no reply for these: it learns on its next use of the object.
        log.info("control operation %s failed: %s", op, _message(e))
