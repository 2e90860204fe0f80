"""`ServerState`: what every part of the server shares: runtime, engine, config, metrics,
the drain flag, built-in programs, and the registry of client-protocol instances.

Every launch from the network goes through `ServerState.launch`, so draining, limits and
metrics apply to the WebSocket protocol and the OpenAI API alike.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pie import __version__
from pie.runtime.errors import LaunchError
from pie.runtime.limits import InstanceLimits
from pie.server.admission import PageAdmission
from pie.server.config import ServerConfig
from pie.server.metrics import ServerMetrics, StepRecorder
from pie.server.sessions import ChannelRegistry


class ServerDraining(LaunchError):
    """The server is shutting down and takes no new instances (HTTP 503, error frame)."""


@dataclass
class ServerState:
    runtime: Any  # pie.runtime.runtime.Runtime
    engine: Any  # pie.engine.engine.Engine (or a stand-in with the same attributes)
    config: ServerConfig
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    draining: bool = False
    builtin: dict[str, str] = field(default_factory=dict)  # built-in program name -> hash
    channels: ChannelRegistry = field(default_factory=ChannelRegistry)
    connections: set[Any] = field(default_factory=set)  # open ws.Connection objects
    started_at: float = field(default_factory=time.time)
    _builtin_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        StepRecorder(self.metrics).attach(self.runtime.scheduler)  # one observation per step
        self.admission = PageAdmission(
            capacity=int(self.runtime.pool.num_pages),
            page_size=int(getattr(self.engine, "page_size", 16)),
        )

    # ---- launching ------------------------------------------------------------------------------
    def launch(
        self,
        program: str,
        args: list[str],
        session: Any,
        *,
        source: str = "ws",
        limits: InstanceLimits | None = None,
    ) -> Any:
        """Starts `program` (hash or name) and returns the runtime's instance handle.

        Raises ServerDraining while the server drains and LaunchError when the runtime refuses
        (unknown program, too many instances); both are counted in `pie_errors`.
        """
        if self.draining:
            self.metrics.errors.labels("draining").inc()
            raise ServerDraining(
                "the server is shutting down and takes no new instances; retry after it restarts"
            )
        began = time.monotonic()
        try:
            instance = self.runtime.launch(
                program,
                list(args),
                session=session,
                limits=limits or self.config.instance_limits(),
            )
        except LaunchError:
            self.metrics.errors.labels("launch").inc()
            raise
        self.metrics.launches.labels(source).inc()
        self.metrics.launch_wait.observe(time.monotonic() - began)
        instance.done.add_done_callback(self._count_outcome)
        return instance

    def page_counts(self) -> dict[str, int]:
        """The pool: pages programs hold (`used`), pages only the prefix cache holds
        (`reusable`: given back on demand), `free`, `total`, and all the cache keeps."""
        pool, cache = self.runtime.pool, self.runtime.prefix_cache
        reusable = cache.reusable() if cache is not None else 0
        return {
            "used": int(pool.used_count) - reusable,
            "reusable": reusable,
            "free": int(pool.free_count),
            "total": int(pool.num_pages),
            "cached": cache.stats.pages if cache is not None else 0,
        }

    def _count_outcome(self, done: cf.Future[str]) -> None:
        if done.cancelled() or done.exception() is not None:
            self.metrics.errors.labels("instance_failed").inc()

    def register_builtin(self, name: str, source_path: str | os.PathLike[str]) -> str:
        """Builds (cached by content) and registers a built-in inferlet; returns its hash."""
        with self._builtin_lock:
            if name not in self.builtin:
                self.builtin[name] = self.runtime.add_source(source_path, name=name)
            return self.builtin[name]

    # ---- what clients may ask -----------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """The model, the pool and the scheduler now (the protocol's `info`, the web page)."""
        engine = self.engine
        stats = self.runtime.scheduler.stats
        return {
            "version": __version__,
            "model": str(engine.model_name),
            "vocab_size": int(engine.vocab_size),
            "max_position": int(engine.max_position),
            "page_size": int(getattr(engine, "page_size", 0)),
            "device": str(getattr(engine, "device", "")),
            "pages": self.page_counts(),
            "scheduler": {
                "steps": int(stats.steps),
                "forwards": int(stats.forwards),
                "tokens": int(stats.tokens),
                "mean_sequences_per_step": float(stats.mean_sequences_per_step),
                "mean_tokens_per_step": float(stats.mean_tokens_per_step),
                "queue_depth": int(stats.queue_depth),
            },
            "instances": len(self.runtime.instances()),
            "draining": self.draining,
            "uptime_s": time.time() - self.started_at,
        }
