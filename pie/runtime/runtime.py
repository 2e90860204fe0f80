"""`Runtime`: the control process of one server: the control layer over one model engine, the
programs, and every running inferlet, in worker processes or in this one.

It owns the page pool, export registry, context manager and batch scheduler, the message bus,
the `ControlPlane` every instance's host calls end in, and the registry of programs and
instances. Wasm instances run in `workers` worker processes (default: one per CPU; 0 runs them
on threads of this process); native instances (`--native`) always run here. Two runtimes in one
process are independent.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import wasmtime

from pie import __version__
from pie.control.context import ContextManager
from pie.control.exports import ExportRegistry
from pie.control.pacing import DECODE_LATENCY_FACTOR
from pie.control.page_pool import PagePool
from pie.control.prefix_cache import PrefixCache
from pie.control.snapshots import SnapshotSettings
from pie.runtime.build import build_inferlet, cache_dir, source_hash
from pie.runtime.errors import HostError, InstanceFailed, LaunchError
from pie.runtime.host.control_port import ControlPort, LocalControl
from pie.runtime.host.state import HostModel, HostServices, InstanceHost, Session
from pie.runtime.instance import InferletInstance, Program
from pie.runtime.limits import KV_SHARE, InstanceLimits
from pie.runtime.messaging import MessageBus
from pie.runtime.plane.plane import ControlPlane
from pie.runtime.plane.snapshots import snapshot_store
from pie.runtime.records import InstanceRecord
from pie.runtime.sandbox import Sandbox
from pie.runtime.session import QueueSession
from pie.runtime.workers.pool import WorkerPool, default_workers

log = logging.getLogger(__name__)

WASM_MAGIC = b"\0asm"


class Runtime:
    """Runs inferlets against one model engine. Use as a context manager, or call `close()`."""

    def __init__(
        self,
        engine: Any,
        *,
        limits: InstanceLimits | None = None,
        cache: Path | None = None,
        max_batch_tokens: int = 512,
        max_instances: int = 256,
        preopen_dirs: dict[str, str] | None = None,
        scheduler: Any = None,
        workers: int | None = None,
        kv_share: float = KV_SHARE,
        decode_latency_factor: float | None = DECODE_LATENCY_FACTOR,
        prefix_cache: bool = False,
        snapshots: SnapshotSettings | None = None,
    ) -> None:
        from pie.control.scheduler import BatchScheduler

        self.engine = engine
        self.limits = limits or InstanceLimits()
        self.max_instances = max_instances
        self.pool = PagePool(engine.num_pages)
        self.exports = ExportRegistry(self.pool)
        self.scheduler = scheduler or BatchScheduler(
            engine, max_batch_tokens=max_batch_tokens, decode_latency_factor=decode_latency_factor
        )
        self.contexts = ContextManager(self.pool, self.exports, self.scheduler)
        # Automatic prefix caching (prefix_cache.py): off here, on in `pie serve` by default.
        self.prefix_cache = PrefixCache(self.pool, engine.page_size) if prefix_cache else None
        if self.prefix_cache is not None:
            self.scheduler.prefix_cache = self.prefix_cache
            self.pool.reclaim = self.prefix_cache.evict
        self.scheduler.start()
        self.bus = MessageBus()
        # Named KV snapshots (control/snapshots.py); persisted when a directory is given.
        self.snapshots = snapshot_store(engine, self.pool, snapshots or SnapshotSettings())
        self.plane = ControlPlane(
            engine, self.pool, self.exports, self.contexts, self.scheduler, self.bus, self,
            kv_share, self.snapshots,
        )  # fmt: skip
        self.model = HostModel.of(engine)
        self.services = HostServices(self.model, __version__)
        self.cache_root = cache if cache is not None else cache_dir()
        self.sandbox = Sandbox(self.cache_root, preopen_dirs)
        self.components = self.sandbox.components
        self._programs: dict[str, Program] = {}
        self._names: dict[str, str] = {}
        self._instances: dict[int, InstanceRecord] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._closed = False
        count = default_workers() if workers is None else workers
        self.workers: WorkerPool | None = None
        if count > 0:
            try:
                self.workers = WorkerPool(self, count)
            except BaseException:
                self.scheduler.stop()
                self.sandbox.close()
                raise

    @property
    def wasm_engine(self) -> Any:
        return self.sandbox.wasm_engine

    # ---- programs --------------------------------------------------------------------------------
    def add_component(self, wasm: bytes | str | os.PathLike[str], name: str | None = None) -> str:
        """Registers a built component; returns its content hash (also usable as its name)."""
        data = wasm if isinstance(wasm, bytes) else Path(wasm).read_bytes()
        where = "the component" if isinstance(wasm, bytes) else str(wasm)
        if not data.startswith(WASM_MAGIC):  # wasmtime would try it as WAT text: "not utf-8"
            raise LaunchError(f"{where} is not a WebAssembly component (no \\0asm header)")
        try:
            digest, component = self.components.load(data)
        except wasmtime.WasmtimeError as e:
            cause = str(e).strip().splitlines()[0] if str(e).strip() else "invalid"
            raise LaunchError(f"{where} is not a loadable inferlet component: {cause}") from None
        label = name or (Path(wasm).stem if not isinstance(wasm, bytes) else digest[:12])
        self._register(Program(digest, label, component=component), name, data)
        return digest

    def add_source(
        self, source: str | os.PathLike[str], name: str | None = None, *, native: bool = False
    ) -> str:
        """Registers a Python inferlet: built into a component (cached), or as source only for
        native mode. Returns the program hash."""
        path = Path(source).resolve()
        label = name or path.stem
        if native:
            digest = source_hash(path)
            self._register(Program(digest, label, source=path), name, None)
            return digest
        data = build_inferlet(path).read_bytes()
        digest, component = self.components.load(data)
        self._register(Program(digest, label, component=component, source=path), name, data)
        return digest

    def _register(self, program: Program, name: str | None, wasm: bytes | None) -> None:
        with self._lock:
            self._programs[program.hash] = program
            self._names[name or program.name] = program.hash
        if self.workers is not None and wasm is not None:
            artifact = self.components.artifact(program.hash, wasm)
            self.workers.add_program(program, str(artifact))

    def has_program(self, ref: str) -> bool:
        """Whether `ref` (a hash or a name) names a registered program."""
        with self._lock:
            return self._names.get(ref, ref) in self._programs

    def program(self, ref: str) -> Program:
        with self._lock:
            digest = self._names.get(ref, ref)
            found = self._programs.get(digest)
        if found is None:
            raise LaunchError(f"unknown program {ref!r}: register it (pie build / upload) first")
        return found

    # ---- instances -------------------------------------------------------------------------------
    def launch(
        self,
        program: str,
        args: Sequence[str] = (),
        *,
        session: Session | None = None,
        limits: InstanceLimits | None = None,
        native: bool = False,
        depth: int = 0,
        parent: InstanceRecord | None = None,
    ) -> InstanceRecord:
        """Starts an instance of `program` (hash or name) and returns it at once."""
        if self._closed:
            raise LaunchError("the runtime is closed")
        prog = self.program(program)
        with self._lock:
            self._instances = {i: x for i, x in self._instances.items() if x.running}
            if len(self._instances) >= self.max_instances:
                raise LaunchError(
                    f"{self.max_instances} inferlets are running; wait for some to finish"
                )
            record = InstanceRecord(
                self,
                next(self._ids),
                prog,
                list(args),
                session or QueueSession(),
                limits or self.limits,
                native=native,
                depth=depth,
                parent=parent,
            )
            self._instances[record.id] = record
        try:
            self.plane.register(record.id, record.session, record.limits)
            if native or self.workers is None or prog.component is None:
                self._start_here(record)
            else:
                self.workers.launch(record)
        except Exception as e:
            self.plane.release(record.id)
            with self._lock:
                self._instances.pop(record.id, None)
            raise LaunchError(f"could not start {prog.name}: {e}") from e
        return record

    def _start_here(self, record: InstanceRecord) -> None:
        control: ControlPort = LocalControl(self.plane, record.id)  # type: ignore[assignment]
        host = InstanceHost(
            id=record.id,
            program=record.program.hash,
            args=record.args,
            services=self.services,
            control=control,
            limits=record.limits,
        )
        instance = InferletInstance(
            self.sandbox,
            record.program,
            host,
            native=record.native,
            on_end=lambda _, outcome: self.instance_ended(record, outcome),
        )
        record.local = instance
        instance.start()

    def instance_ended(self, record: InstanceRecord, outcome: str | InstanceFailed) -> None:
        """Releases what the instance held here, ends its children, resolves `done`."""
        for child in record.live_children():
            child.cancel(f"its parent (instance {record.id}) ended")
        self.plane.release(record.id)
        record.ended_at = time.monotonic()
        if isinstance(outcome, BaseException):
            record.done.set_exception(outcome)
        else:
            record.done.set_result(outcome)

    def run(self, program: str, args: Sequence[str] = (), **kwargs: Any) -> str:
        """Launches and waits; returns the result or raises InstanceFailed."""
        return self.launch(program, args, **kwargs).wait()

    def instance(self, instance_id: int) -> InstanceRecord | None:
        with self._lock:
            return self._instances.get(instance_id)

    def instances(self) -> list[InstanceRecord]:
        with self._lock:
            return [x for x in self._instances.values() if x.running]

    # ---- children (the plane's `Instances`) ---------------------------------------------------------
    def launch_child(self, parent_id: int, program: str, args: list[str]) -> tuple[int, Any]:
        parent = self.instance(parent_id)
        if parent is None or not parent.running:
            raise HostError(f"instance {parent_id} has ended")
        limits = parent.limits
        if parent.depth + 1 > limits.max_depth:
            raise HostError(
                f"launch depth limit reached ({limits.max_depth}): a child may not launch "
                "children this deep"
            )
        if len(parent.live_children()) >= limits.max_children:
            raise HostError(
                f"child limit reached ({limits.max_children} running): await or cancel children first"
            )
        try:
            prog = self.program(program)
            # A native parent runs its children natively when it can: one debugger sees them all.
            native = parent.native and prog.source is not None
            child = self.launch(
                prog.hash,
                args,
                session=parent.session,
                limits=limits,
                native=native,
                depth=parent.depth + 1,
                parent=parent,
            )
        except LaunchError as e:  # the parent can handle it: an err, not a trap
            raise HostError(str(e)) from None
        parent.children.append(child)
        return child.id, child.done

    def cancel_child(self, parent_id: int, child_id: int, reason: str) -> None:
        parent = self.instance(parent_id)
        child = next((c for c in parent.children if c.id == child_id), None) if parent else None
        if child is None:
            raise HostError(f"instance {child_id} is not a child of instance {parent_id}")
        child.cancel(reason)

    # ---- lifecycle -------------------------------------------------------------------------------
    def close(self, timeout: float = 5.0) -> None:
        """Stops every instance, waits for them (up to `timeout`), stops the workers and the
        scheduler."""
        if self._closed:
            return
        self._closed = True
        running = self.instances()
        for record in running:
            record.cancel("the runtime is shutting down")
        for record in running:
            try:
                record.done.exception(timeout)  # waits; failures are expected here
            except TimeoutError:
                log.warning("instance %d did not stop within %.1f s", record.id, timeout)
        if self.workers is not None:
            self.workers.close()
        self.scheduler.stop()
        if self.prefix_cache is not None:
            self.prefix_cache.clear()
        self.snapshots.clear()  # their files, if any, stay for the next process
        self.sandbox.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
