"""`LiveStats`: the web page's live view of the server, served as JSON at `GET /api/stats`: the
pool, instances and scheduler now, plus a one-sample-a-second history of them and of rates
(tokens/s, batch sizes) taken from deltas of the scheduler's cumulative stats.

The history lives on the server so a page opened now shows the last minutes at once, and every
open page sees the same numbers (rates computed per client would depend on its poll timing).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

HISTORY_SAMPLES = 180  # three minutes at one sample a second; a page shows what it fits


@dataclass(frozen=True)
class StatsSample:
    """The server at one moment, with rates over the interval since the previous sample."""

    t: float  # unix seconds (the page labels its time axis with these)
    instances: int  # instances running now
    pages_used: int
    pages_free: int
    queue_depth: int  # forwards waiting for the engine now
    batch_sequences: float  # mean sequences per engine step over the interval (0: no steps)
    batch_tokens: float  # mean tokens per engine step over the interval
    tokens_per_s: float  # tokens run through the engine per second (prompt and generated)
    steps_per_s: float


@dataclass
class _Totals:
    """The scheduler's cumulative counts at the previous sample."""

    at: float  # time.monotonic()
    steps: int
    tokens: int
    sequences: float  # total sequence-steps (mean sequences per step x steps)


class LiveStats:
    """Samples `runtime` every `interval_s` into a bounded history; `response` serves it."""

    def __init__(self, state: Any, interval_s: float = 1.0, history: int = HISTORY_SAMPLES):
        self.state = state  # pie.server.state.ServerState
        self.interval_s = interval_s
        self.samples: collections.deque[StatsSample] = collections.deque(maxlen=history)
        self._last: _Totals | None = None

    def _totals(self, at: float) -> _Totals:
        stats = self.state.runtime.scheduler.stats
        sequences = float(stats.mean_sequences_per_step) * int(stats.steps)
        return _Totals(at, int(stats.steps), int(stats.tokens), sequences)

    def sample(self) -> StatsSample:
        """Takes one sample now and appends it to the history."""
        runtime = self.state.runtime
        totals = self._totals(time.monotonic())
        last = self._last or totals
        elapsed = totals.at - last.at
        steps = totals.steps - last.steps
        sample = StatsSample(
            t=time.time(),
            instances=len(runtime.instances()),
            pages_used=self.state.page_counts()["used"],  # programs' pages, not the cache's
            pages_free=int(runtime.pool.free_count),
            queue_depth=int(runtime.scheduler.stats.queue_depth),
            batch_sequences=(totals.sequences - last.sequences) / steps if steps > 0 else 0.0,
            batch_tokens=(totals.tokens - last.tokens) / steps if steps > 0 else 0.0,
            tokens_per_s=(totals.tokens - last.tokens) / elapsed if elapsed > 0 else 0.0,
            steps_per_s=steps / elapsed if elapsed > 0 else 0.0,
        )
        self._last = totals
        self.samples.append(sample)
        return sample

    async def run(self) -> None:
        """Samples until cancelled (the app's lifespan runs this)."""
        while True:
            with contextlib.suppress(Exception):  # a stats hiccup must not end the server
                self.sample()
            await asyncio.sleep(self.interval_s)

    def snapshot(self) -> dict[str, Any]:
        """`now`: the server's info this instant (the protocol's `info`); `history`: oldest first."""
        return {
            "now": self.state.info(),
            "interval_s": self.interval_s,
            "history": [dataclasses.asdict(s) for s in self.samples],
        }

    async def response(self, request: Request) -> Response:
        """`GET /api/stats` (admitted like the other APIs: loopback, or a bearer token)."""
        return JSONResponse(self.snapshot(), headers={"Cache-Control": "no-store"})
