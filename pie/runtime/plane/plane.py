"""`ControlPlane`: everything an instance may ask of the control process, by instance id.

The host side of each WIT call that touches shared state (KV contexts, forward passes,
delegated generations, the message bus, the client session, children) ends here, whether the
instance runs on a thread of this process (`host/control_port.LocalControl`) or in a worker
process (`workers/hub.py` calls these same methods for the frames it receives). Contexts,
generations and subscriptions are keyed by the handle the instance's host gave them, so an
instance can only ever name its own; `release` returns all of it when the instance ends.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from pie.control.context import ContextManager, KvContext
from pie.control.exports import ExportRegistry
from pie.control.forward import ForwardRequest
from pie.control.page_pool import PagePool
from pie.control.scheduler import BatchScheduler
from pie.control.snapshots import LOCAL_USER, SnapshotStore
from pie.engine.request import Greedy, Sample, SampleResult, SamplerSpec
from pie.runtime.calls import ForwardCall, GeneratedChunk, GenerateSpec
from pie.runtime.errors import GUEST_ERRORS, HostError
from pie.runtime.limits import InstanceLimits
from pie.runtime.messaging import MessageBus, Subscription
from pie.runtime.plane.generation import Generation
from pie.runtime.plane.grammars import Applied, Constraints, ConstraintState
from pie.runtime.plane.requests import forward_request
from pie.runtime.plane.snapshots import open_snapshot, snapshot_args

log = logging.getLogger(__name__)

# Operations that wait for a context's forwards to finish (at most a step or so): a caller that
# serves many instances (the worker hub) runs them off its own thread.
WAITING_OPS = frozenset({"kv_fork", "kv_truncate", "kv_export", "kv_close", "kv_save", "kv_open"})


class Instances(Protocol):
    """What the plane needs from the runtime's registry of instances."""

    def launch_child(self, parent: int, program: str, args: list[str]) -> tuple[int, Any]: ...
    def cancel_child(self, parent: int, child: int, reason: str) -> None: ...


@dataclass(eq=False)
class OwnerState:
    """One live instance's objects in the control process, by the handles its host chose."""

    session: Any
    user: str = LOCAL_USER  # whose snapshots it saves and may open
    contexts: dict[int, KvContext] = field(default_factory=dict)
    generations: dict[int, Generation] = field(default_factory=dict)
    busy: dict[KvContext, Generation] = field(default_factory=dict)  # generating contexts
    subscriptions: dict[int, Subscription] = field(default_factory=dict)
    waiting: set[cf.Future[Any]] = field(default_factory=set)  # receives and pulls


class ControlPlane:
    """Thread-safe. One per runtime."""

    def __init__(
        self,
        engine: Any,
        pool: PagePool,
        exports: ExportRegistry,
        contexts: ContextManager,
        scheduler: BatchScheduler,
        bus: MessageBus,
        instances: Instances,
        kv_share: float = 1.0,
        snapshots: SnapshotStore | None = None,
    ) -> None:
        self.engine = engine
        self.pool = pool
        self.exports = exports
        self.contexts = contexts
        self.scheduler = scheduler
        self.bus = bus
        self.instances = instances
        self.default_kv_pages = default_quota(engine, pool.num_pages, kv_share)
        self.snapshots = snapshots or SnapshotStore(pool)
        self._lock = threading.Lock()
        self._owners: dict[int, OwnerState] = {}
        # grammar matchers following contexts (pie/runtime/plane/grammars.py)
        self.grammars = Constraints(engine.tokenizer, int(engine.vocab_size))

    # ---- instance life ----------------------------------------------------------------------
    def register(self, owner: int, session: Any, limits: InstanceLimits) -> None:
        """Takes `owner` in: its page quota (its own, else the default share), the pages set
        aside for it (PoolExhaustedError if the pool cannot), its priority for pages."""
        quota = limits.kv_pages if limits.kv_pages is not None else self.default_kv_pages
        if quota is not None and limits.kv_reserve > quota:
            raise HostError(
                f"kv_reserve of {limits.kv_reserve} pages is more than the instance may hold "
                f"({quota}); raise kv_pages too"
            )
        self.pool.set_aside(owner, limits.kv_reserve)
        self.pool.set_quota(owner, quota)
        self.scheduler.set_priority(owner, limits.priority)
        with self._lock:
            self._owners[owner] = OwnerState(session, limits.user)

    def release(self, owner: int) -> None:
        """Everything `owner` holds goes back: its generations stop, its queued forwards are
        failed (waiting for any inside the running step), its pages are freed."""
        with self._lock:
            state = self._owners.pop(owner, None)
        if state is not None:
            for gen in state.generations.values():
                gen.stop()
            for sub in state.subscriptions.values():
                sub.close()
            for future in state.waiting:
                future.cancel()
        try:
            self.scheduler.cancel_owner(owner)
            self.contexts.close_owner(owner)
        except Exception:
            log.exception("instance %d: releasing its forwards and contexts failed", owner)
        self.grammars.drop_owner(owner)
        self.pool.release_owner(owner)
        self.pool.set_quota(owner, None)

    def _state(self, owner: int) -> OwnerState:
        state = self._owners.get(owner)
        if state is None:
            raise HostError(f"instance {owner} has ended")
        return state

    def _ctx(self, owner: int, handle: int, *, idle: bool = True) -> KvContext:
        with self._lock:
            state = self._state(owner)
            ctx = state.contexts.get(handle)
            if ctx is None:
                raise HostError(f"context handle {handle} is not open in this inferlet")
            if idle and ctx in state.busy:
                raise HostError(
                    f"a generation is running on context {handle}; wait for it to end (or "
                    "stop it) first"
                )
            return ctx

    def _add_ctx(self, owner: int, handle: int, ctx: KvContext) -> None:
        with self._lock:
            state = self._owners.get(owner)
            if state is not None and handle not in state.contexts:
                state.contexts[handle] = ctx
                return
        self.contexts.close(ctx)
        raise HostError(f"context handle {handle} is taken, or instance {owner} has ended")

    # ---- kv -----------------------------------------------------------------------------------
    def kv_create(self, owner: int, handle: int) -> None:
        self._add_ctx(owner, handle, self.contexts.create(owner))

    def kv_fork(self, owner: int, handle: int, new: int) -> None:
        parent = self._ctx(owner, handle)
        child = self.contexts.fork(parent)
        self._add_ctx(owner, new, child)
        self.grammars.fork(parent, child)

    def kv_length(self, owner: int, handle: int) -> int:
        return int(self._ctx(owner, handle, idle=False).length)

    def kv_page_count(self, owner: int, handle: int) -> int:
        return len(self._ctx(owner, handle, idle=False).pages)

    def kv_reserve(self, owner: int, handle: int, slots: int) -> None:
        self.contexts.preallocate(self._ctx(owner, handle), slots)

    def kv_truncate(self, owner: int, handle: int, length: int) -> None:
        ctx = self._ctx(owner, handle)
        self.contexts.truncate(ctx, length)
        self.grammars.truncate(ctx, length)

    def kv_mask(self, owner: int, handle: int, start: int, end: int, hidden: bool) -> None:
        self.contexts.mask(self._ctx(owner, handle), start, end, hidden)

    def kv_export(self, owner: int, handle: int, name: str) -> None:
        self.contexts.export(self._ctx(owner, handle), name)

    def kv_import(self, owner: int, new: int, name: str) -> None:
        self._add_ctx(owner, new, self.contexts.import_(owner, name))

    def kv_unexport(self, owner: int, name: str) -> None:
        self.exports.unexport(owner, name)

    def kv_exports(self, owner: int) -> list[str]:
        return [str(n) for n in self.exports.list()]

    def kv_save(self, owner: int, handle: int, name: str, ttl_s: int | None) -> None:
        self.snapshots.save(*snapshot_args(self, owner, self._ctx(owner, handle), name, ttl_s))

    def kv_open(self, owner: int, new: int, name: str) -> None:
        self._add_ctx(owner, new, open_snapshot(self, owner, name))

    def kv_snapshot_delete(self, owner: int, name: str) -> None:
        self.snapshots.delete(self.user_of(owner), name)

    def kv_snapshots(self, owner: int) -> list[str]:
        return self.snapshots.names(self.user_of(owner))

    def user_of(self, owner: int) -> str:
        """The user `owner` was launched for (the owner of its snapshots)."""
        with self._lock:
            return self._state(owner).user

    def kv_close(self, owner: int, handle: int) -> None:
        ctx = self._ctx(owner, handle)
        with self._lock:
            state = self._owners.get(owner)
            if state is not None:
                state.contexts.pop(handle, None)
        self.grammars.drop(ctx)
        self.contexts.close(ctx)

    # ---- forward passes -----------------------------------------------------------------------
    def submit(
        self, owner: int, passes: list[tuple[int, ForwardCall]]
    ) -> list[cf.Future[list[SampleResult]]]:
        """Per pass a future: its outputs, or why it was refused. Passes are queued together,
        in order, so none of them can miss the step the others go into."""
        futures: list[cf.Future[list[SampleResult]] | None] = []
        requests: list[ForwardRequest] = []
        ahead: dict[KvContext, int] = {}  # tokens of earlier passes in this call, per context
        applied = []  # what each request did to its context's grammar matcher, if any
        for handle, call in passes:
            try:
                ctx = self._ctx(owner, handle)
                start = ctx.length + ahead.get(ctx, 0)
                request = forward_request(ctx, start, call, int(self.engine.vocab_size))
                applied.append(self.grammars.apply(request))
                requests.append(request)
                ahead[ctx] = ahead.get(ctx, 0) + len(call.tokens)
                futures.append(None)
            except GUEST_ERRORS as e:
                refused: cf.Future[list[SampleResult]] = cf.Future()
                refused.set_exception(e)
                futures.append(refused)
        queued = self.scheduler.submit_many(requests)
        # newest first: passes refused at once roll their context's matcher back in turn
        for done, future in reversed(list(zip(applied, queued, strict=True))):
            self.grammars.watch(done, future)
        submitted = iter(queued)
        return [next(submitted) if f is None else f for f in futures]

    def _submit_tokens(
        self, ctx: KvContext, tokens: list[int], sampler: SamplerSpec
    ) -> cf.Future[list[SampleResult]]:
        request = ForwardRequest(context=ctx, tokens=tokens, outputs=[(len(tokens) - 1, sampler)])
        applied = self.grammars.apply(request)  # a rejected token fails the generation
        future = self.scheduler.submit(request)
        self.grammars.watch(applied, future)
        return future

    def generate_many(self, owner: int, runs: list[tuple[int, int, GenerateSpec]]) -> None:
        """Starts delegated loops, each `(generation handle, context handle, spec)`; their first
        passes are queued together (one step for all of them), their chunks come from
        `generate_next`. A loop that cannot start fails its first chunk."""
        with self._lock:
            state = self._owners.get(owner)
        if state is None:
            raise HostError(f"instance {owner} has ended")
        starting: list[tuple[Generation, ForwardRequest, Applied | None]] = []
        for gen_id, handle, spec in runs:
            made = self._new_generation(owner, state, gen_id, handle, spec)
            if made is None:
                continue
            gen, ctx = made
            if spec.max_tokens <= 0:
                gen.start()  # nothing to run: it ends at once
                continue
            sampled: list[tuple[int, SamplerSpec]] = [(len(spec.tokens) - 1, spec.sampler)]
            request = ForwardRequest(ctx, list(spec.tokens), outputs=sampled)
            try:
                applied = self.grammars.apply(request)
            except GUEST_ERRORS as e:  # a queued token the context's grammar rejects
                gen.fail(e)
                continue
            starting.append((gen, request, applied))
        futures = self.scheduler.submit_many([request for _, request, _ in starting])
        for (gen, _, applied), future in zip(starting, futures, strict=True):
            self.grammars.watch(applied, future)
            gen.begin(future)

    def _new_generation(
        self, owner: int, state: OwnerState, gen_id: int, handle: int, spec: GenerateSpec
    ) -> tuple[Generation, KvContext] | None:
        session = state.session
        ctx: KvContext | None = None

        def ended(gen: Generation) -> None:
            with self._lock:
                if ctx is not None and state.busy.get(ctx) is gen:
                    del state.busy[ctx]

        try:
            if not isinstance(spec.sampler, Greedy | Sample):
                raise HostError("a delegated generation samples with greedy or sample only")
            ctx = self._ctx(owner, handle)
            gen = Generation(
                spec,
                partial(self._submit_tokens, ctx),
                self.engine.tokenizer,
                partial(session.send_text, owner),
                ended,
            )
            with self._lock:
                state.busy[ctx] = gen
            self._add_generation(state, gen_id, gen)
        except GUEST_ERRORS as e:
            ctx = None
            failed = Generation(spec, _never, None, None, ended)
            failed.fail(e)
            with contextlib.suppress(HostError):
                self._add_generation(state, gen_id, failed)
            return None
        return gen, ctx

    def _add_generation(self, state: OwnerState, gen_id: int, gen: Generation) -> None:
        with self._lock:
            if gen_id in state.generations:
                raise HostError(f"generation handle {gen_id} is taken")
            state.generations[gen_id] = gen

    def generate_next(self, owner: int, gen_id: int) -> cf.Future[GeneratedChunk]:
        with self._lock:
            gen = self._state(owner).generations.get(gen_id)
        if gen is None:
            raise HostError(f"generation handle {gen_id} is not open in this inferlet")
        future = gen.next_chunk()
        if not gen.running and future.done():  # the last chunk: the generation is gone
            with self._lock:
                state = self._owners.get(owner)
                if state is not None:
                    state.generations.pop(gen_id, None)
        return future

    def generate_stop(self, owner: int, gen_id: int) -> None:
        with self._lock:
            gen = self._state(owner).generations.get(gen_id)
        if gen is not None:
            gen.stop()

    # ---- grammars -----------------------------------------------------------------------------
    def grammar_constrain(self, owner: int, handle: int, grammar: str, start: int) -> None:
        """Attaches a fresh matcher of `grammar` (compiled by the instance's host) to the
        context, matching its tokens from slot `start` on."""
        self.grammars.attach(self._ctx(owner, handle), grammar, start)

    def grammar_release_constraint(self, owner: int, handle: int) -> bool:
        return self.grammars.detach(self._ctx(owner, handle))

    def grammar_state(self, owner: int, handle: int) -> list[Any] | None:
        """[matched, accepting, stopped] of the context's matcher; None without one."""
        state: ConstraintState | None = self.grammars.state(self._ctx(owner, handle, idle=False))
        return None if state is None else [state.matched, state.accepting, state.stopped]

    # ---- the client session -------------------------------------------------------------------
    def send_text(self, owner: int, text: str) -> None:
        self._session(owner).send_text(owner, text)

    def send_blob(self, owner: int, data: bytes) -> None:
        self._session(owner).send_blob(owner, data)

    def output(self, owner: int, stream: str, line: str) -> None:
        self._session(owner).output(owner, stream, line)

    def receive_text(self, owner: int) -> cf.Future[str]:
        return self._waiting(owner, self._session(owner).receive_text(owner))

    def receive_blob(self, owner: int) -> cf.Future[bytes]:
        return self._waiting(owner, self._session(owner).receive_blob(owner))

    def _session(self, owner: int) -> Any:
        with self._lock:
            return self._state(owner).session

    def _waiting(self, owner: int, future: cf.Future[Any]) -> cf.Future[Any]:
        """Tracks a receive or pull so that `release` can withdraw it."""
        with self._lock:
            state = self._owners.get(owner)
            if state is None:
                future.cancel()
                return future
            state.waiting.add(future)
        future.add_done_callback(lambda f: self._settled(owner, f))
        return future

    def _settled(self, owner: int, future: cf.Future[Any]) -> None:
        with self._lock:
            state = self._owners.get(owner)
            if state is not None:
                state.waiting.discard(future)

    # ---- messaging ----------------------------------------------------------------------------
    def push(self, owner: int, topic: str, message: str) -> None:
        self.bus.push(topic, message)

    def broadcast(self, owner: int, topic: str, message: str) -> None:
        self.bus.broadcast(topic, message)

    def pull(self, owner: int, topic: str) -> cf.Future[str]:
        return self._waiting(owner, self.bus.pull(topic))

    def subscribe(self, owner: int, sub_id: int, topic: str) -> None:
        sub = self.bus.subscribe(topic)
        with self._lock:
            state = self._owners.get(owner)
            if state is not None and sub_id not in state.subscriptions:
                state.subscriptions[sub_id] = sub
                return
        sub.close()
        raise HostError(f"subscription handle {sub_id} is taken, or instance {owner} has ended")

    def next_message(self, owner: int, sub_id: int) -> cf.Future[str]:
        with self._lock:
            sub = self._state(owner).subscriptions.get(sub_id)
        if sub is None:
            raise HostError(f"subscription handle {sub_id} is not open in this inferlet")
        return self._waiting(owner, sub.next())

    def unsubscribe(self, owner: int, sub_id: int) -> None:
        with self._lock:
            sub = self._state(owner).subscriptions.pop(sub_id, None)
        if sub is not None:
            sub.close()

    # ---- children -----------------------------------------------------------------------------
    def launch_child(self, owner: int, program: str, args: list[str]) -> tuple[int, Any]:
        return self.instances.launch_child(owner, program, args)

    def cancel_child(self, owner: int, child: int, reason: str) -> None:
        self.instances.cancel_child(owner, child, reason)


def default_quota(engine: Any, num_pages: int, share: float) -> int | None:
    """The page quota of an instance launched with no `kv_pages` limit: `share` of the pool,
    so that one program cannot take every page and leave the others nothing to start with,
    but never less than one context of the model's full length (None: the whole pool)."""
    one_context = -(-int(engine.max_position) // int(engine.page_size))
    quota = max(int(num_pages * share), one_context)
    return None if quota >= num_pages else quota


def _never(tokens: list[int], sampler: Any) -> cf.Future[list[SampleResult]]:
    raise HostError("this generation failed before it started")


def call(plane: ControlPlane, op: str, owner: int, args: list[Any]) -> Any:
    """Runs the plane operation named `op` (a frame's operation name); unknown names refused."""
    method: Callable[..., Any] | None = getattr(plane, op, None) if op in OPERATIONS else None
    if method is None:
        raise HostError(f"unknown control operation {op!r}")
    return method(owner, *args)


OPERATIONS = frozenset(
    {
        "kv_create", "kv_fork", "kv_length", "kv_page_count", "kv_reserve", "kv_truncate",
        "kv_mask", "kv_export", "kv_import", "kv_unexport", "kv_exports", "kv_close",
        "kv_save", "kv_open", "kv_snapshot_delete", "kv_snapshots",
        "generate_many", "generate_next", "generate_stop",
        "grammar_constrain", "grammar_release_constraint", "grammar_state",
        "send_text", "send_blob", "output", "receive_text", "receive_blob",
        "push", "broadcast", "pull", "subscribe", "next_message", "unsubscribe",
        "launch_child", "cancel_child",
    }
)  # fmt: skip
