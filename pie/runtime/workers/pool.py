"""`WorkerPool`: the worker processes of one runtime, started, fed programs, given instances,
and replaced when one dies.

Each worker is `python -m pie.runtime.workers.worker` on one end of a socket pair. A launch goes
to the worker running the fewest instances. A worker that dies (killed, crashed) ends only its
own instances: each fails with the cause, its pages come back, the engine serves the rest, and
a fresh worker takes the dead one's place.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
from typing import TYPE_CHECKING

import msgspec

from pie.runtime.errors import InstanceFailed, LaunchError
from pie.runtime.workers import frames
from pie.runtime.workers.channel import Channel
from pie.runtime.workers.connection import WorkerConnection
from pie.runtime.workers.outbox import GAP_SECONDS
from pie.runtime.workers.worker import Setup

if TYPE_CHECKING:
    from pie.runtime.instance import Program
    from pie.runtime.records import InstanceRecord
    from pie.runtime.runtime import Runtime

log = logging.getLogger(__name__)


def default_workers() -> int:
    """One worker per CPU the process may use, at most 16 (`PIE_WORKERS` overrides)."""
    if "PIE_WORKERS" in os.environ:
        return int(os.environ["PIE_WORKERS"])
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(16, cpus))


class WorkerPool:
    def __init__(self, runtime: Runtime, count: int, gap_s: float = GAP_SECONDS) -> None:
        if count < 1:
            raise LaunchError(f"a worker pool needs at least one worker, got {count}")
        self.runtime = runtime
        self.gap_s = gap_s
        self.scheduler_thread: threading.Thread | None = None
        self.dirty: set[WorkerConnection] = set()  # answers made during the engine step
        # Operations that wait for a context to go idle, and instance releases, run here.
        self.plane_thread = cf.ThreadPoolExecutor(1, thread_name_prefix="pie-plane")
        self._lock = threading.Lock()
        self._programs: dict[str, tuple[str, str]] = {}  # hash -> (name, artifact path)
        self._closing = False
        self.workers: list[WorkerConnection] = []
        setup = self._setup_common()
        for index in range(count):
            self.workers.append(self._spawn(index, setup))
        runtime.scheduler.add_step_listener(self.after_step)

    # ---- processes ------------------------------------------------------------------------------
    def _setup_common(self) -> dict[str, object]:
        runtime = self.runtime
        model = runtime.model
        return {
            "protocol": frames.PROTOCOL,
            "cache_root": str(runtime.cache_root),
            "preopen_dirs": dict(runtime.sandbox.preopen_dirs),
            "model": (model.model_name, model.vocab_size, model.page_size, model.max_position),
            "tokenizer": pickle.dumps(model.tokenizer),
            "version": runtime.services.version,
            "gap_s": self.gap_s,
            "log_level": logging.getLogger("pie").getEffectiveLevel(),
        }

    def _spawn(self, index: int, common: dict[str, object]) -> WorkerConnection:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # the same modules
        process = subprocess.Popen(
            [sys.executable, "-m", "pie.runtime.workers.worker", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            env=env,
        )
        theirs.close()
        channel = Channel(ours)
        channel.send(msgspec.msgpack.encode(Setup(index=index, **common)))  # type: ignore[arg-type]
        connection = WorkerConnection(self, index, process, channel)
        with self._lock:
            programs = list(self._programs.items())
        for digest, (name, path) in programs:
            connection.post(frames.AddProgram(digest, name, path))
        connection.flush()
        connection.start()
        return connection

    def worker_died(self, connection: WorkerConnection) -> None:
        """Ends the dead worker's instances with the cause and starts a replacement."""
        with self._lock:
            connection.alive = False
            if self._closing:
                return
        try:
            code = connection.process.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            connection.process.kill()
            code = connection.process.wait()
        cause = (
            f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        )
        reason = (
            f"its worker process {connection.index} (pid {connection.process.pid}) died: {cause}"
        )
        log.error("worker %d died (%s); its %d instances end", connection.index, cause,
                  len(connection.instances))  # fmt: skip
        for record in list(connection.instances.values()):
            failure = InstanceFailed(
                f"instance {record.id} ({record.program.name}) ended: {reason}"
            )
            self.plane_thread.submit(self.runtime.instance_ended, record, failure)
        connection.instances.clear()
        connection.channel.close()
        if self._closing:
            return
        replacement = self._spawn(connection.index, self._setup_common())
        with self._lock:
            self.workers[connection.index] = replacement

    # ---- programs and instances -------------------------------------------------------------------
    def add_program(self, program: Program, path: str) -> None:
        with self._lock:
            if program.hash in self._programs:
                return
            self._programs[program.hash] = (program.name, path)
            workers = list(self.workers)
        for worker in workers:
            worker.post(frames.AddProgram(program.hash, program.name, path))
            worker.flush()

    def launch(self, record: InstanceRecord) -> None:
        with self._lock:
            live = [w for w in self.workers if w.alive]
            if not live:
                raise LaunchError("no worker process is running")
            worker = min(live, key=lambda w: len(w.instances))
            worker.instances[record.id] = record
        record.worker = worker.index
        limits = dataclasses.asdict(record.limits)
        worker.post(frames.Launch(record.id, record.program.hash, list(record.args), limits))
        worker.flush()

    def cancel(self, record: InstanceRecord, reason: str) -> None:
        for worker in self.workers:
            if record.id in worker.instances:
                worker.post(frames.Cancel(record.id, reason))
                worker.flush()

    def after_step(self, step: object = None) -> None:
        """Runs on the engine thread after each step: each worker's answers leave as one frame."""
        if self.scheduler_thread is None:
            self.scheduler_thread = threading.current_thread()
        dirty, self.dirty = self.dirty, set()
        for worker in dirty:
            worker.flush()

    def counters(self, timeout: float = 5.0) -> list[dict[str, float]]:
        """Each live worker's counters (host calls, frames, bytes, wake-ups, CPU seconds)."""
        asked = []
        for worker in list(self.workers):
            if worker.alive:
                worker.counters = cf.Future()
                worker.post(frames.CountersPlease())
                worker.flush()
                asked.append(worker.counters)
        return [f.result(timeout) for f in asked]

    def close(self) -> None:
        with self._lock:
            self._closing = True
            workers = list(self.workers)
        for worker in workers:
            worker.post(frames.Shutdown())
            worker.flush()
        for worker in workers:
            try:
                worker.process.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
            worker.channel.close()
        self.plane_thread.shutdown(wait=True)
