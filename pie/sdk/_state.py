"""Per-run state of the SDK (opened models), kept in a context variable.

Natively several inferlets share one interpreter, each on its own thread; a class attribute
would mix their handles, a context variable does not. The entry point resets it per run.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

_cache: ContextVar[dict[str, Any]] = ContextVar("pie_sdk_run_cache")


def run_cache() -> dict[str, Any]:
    """The dictionary of this run's cached objects."""
    try:
        return _cache.get()
    except LookupError:
        fresh: dict[str, Any] = {}
        _cache.set(fresh)
        return fresh


def reset() -> None:
    """Starts a fresh cache (called once per `run`, before the event loop starts)."""
    _cache.set({})
