"""`ServerMetrics`: the Prometheus collectors of one server, in its own registry.

Counters are fed where things happen (launches, errors, tokens); gauges of the pool and
scheduler are refreshed on each scrape; the batch-size and step-time histograms get one
observation per engine step from a scheduler step listener (`StepRecorder`).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pie.control.scheduler import StepInfo

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STEP_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)


class ServerMetrics:
    """Every collector `/metrics` shows; nothing goes to prometheus-client's global registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.running = Gauge("pie_instances_running", "Inferlet instances running", registry=r)
        self.launches = Counter(
            "pie_launches", "Instances launched", ["source"], registry=r
        )  # source: ws | openai | ...
        self.errors = Counter("pie_errors", "Errors by kind", ["kind"], registry=r)
        self.pages_used = Gauge("pie_kv_pages_used", "KV pages in use", registry=r)
        self.pages_free = Gauge("pie_kv_pages_free", "KV pages free", registry=r)
        self.pages_total = Gauge("pie_kv_pages_total", "KV pages in the pool", registry=r)
        self.cache_pages = Gauge(
            "pie_prefix_cache_pages", "KV pages the prefix cache keeps", registry=r
        )
        self.cache_queried = Gauge(
            "pie_prefix_cache_queried_tokens", "Prompt tokens looked up in the cache", registry=r
        )
        self.cache_hits = Gauge(
            "pie_prefix_cache_hit_tokens", "Prompt tokens served from the cache", registry=r
        )
        self.cache_hit_rate = Gauge(
            "pie_prefix_cache_hit_rate", "Hit tokens over queried tokens", registry=r
        )
        self.queue_depth = Gauge(
            "pie_scheduler_queue_depth", "Forwards waiting for the engine", registry=r
        )
        self.batch_size = Histogram(
            "pie_batch_sequences",
            "Sequences per engine step",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Histogram(
            "pie_batch_tokens",
            "Tokens per engine step",
            buckets=(1, 4, 16, 64, 128, 256, 512, 1024, 2048),
            registry=r,
        )
        self.step_seconds = Histogram(
            "pie_step_seconds",
            "Engine step time",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.engine_steps = Counter("pie_engine_steps", "Engine steps run", registry=r)
        self.engine_tokens = Counter(
            "pie_engine_tokens", "Tokens run through the engine (prompt and generated)", registry=r
        )
        # Fed by the callers that know what was generated (the OpenAI API's usage counts).
        self.generated_tokens = Counter(
            "pie_generated_tokens", "Tokens generated for clients", registry=r
        )
        self.launch_wait = Histogram(
            "pie_launch_wait_seconds",
            "Time from a launch request to a running instance",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "pie_openai_queue_wait_seconds",
            "Time an OpenAI request waited in line for KV room before its launch",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.openai_waiting = Gauge(
            "pie_openai_waiting", "OpenAI requests in line for KV room", registry=r
        )
        self.connections = Gauge(
            "pie_ws_connections", "Open client-protocol connections", registry=r
        )
        self.draining = Gauge("pie_draining", "1 while the server drains", registry=r)

    def refresh(self, runtime: Any, draining: bool) -> None:
        """Sets the gauges from the runtime's current state (called on each scrape)."""
        pool = runtime.pool
        self.pages_used.set(pool.used_count)
        self.pages_free.set(pool.free_count)
        self.pages_total.set(pool.num_pages)
        cache = getattr(runtime, "prefix_cache", None)
        if cache is not None:
            stats = cache.stats
            self.cache_pages.set(stats.pages)
            self.cache_queried.set(stats.queried_tokens)
            self.cache_hits.set(stats.hit_tokens)
            self.cache_hit_rate.set(stats.hit_tokens / max(stats.queried_tokens, 1))
        self.running.set(len(runtime.instances()))
        self.queue_depth.set(runtime.scheduler.stats.queue_depth)
        self.draining.set(1 if draining else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StepRecorder:
    """Feeds the step histograms and counters from the scheduler, one observation per engine
    step (a step listener on the engine thread: each observation costs a microsecond or two)."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def attach(self, scheduler: Any) -> None:
        scheduler.add_step_listener(self.observe)

    def observe(self, step: StepInfo | None) -> None:
        if step is None:
            return
        m = self.metrics
        m.batch_size.observe(step.sequences)
        m.batch_tokens.observe(step.tokens)
        m.step_seconds.observe(step.seconds)
        m.engine_steps.inc()
        m.engine_tokens.inc(step.tokens)
