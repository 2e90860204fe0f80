"""Preemption: making room in the page pool for a higher-priority program.

When the first forward waiting for pages cannot be admitted, the scheduler (on its engine
thread, between steps) calls `make_room`: the contexts of lower-priority owners, lowest
priority first and the biggest first among equals, are swapped out to host memory
(`ContextManager.swap_out`) until the pages freed cover what the waiter lacks. A swapped
context comes back on its owner's next use of it, when the pool has room, so its program
only waits; the priority order of the page-wait queue then decides who gets the room first.
Pages shared with other contexts (forks, exports, imports) are never swapped, and neither is
a context with a forward in flight. Host memory for swapped pages is bounded (`max_pages`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pie.control.context import ContextManager


def make_room(
    contexts: ContextManager,
    priority_of: Callable[[int], int],
    *,
    for_owner: int,
    priority: int,
    pages: int,
    save: Callable[[list[int]], Any],
    max_pages: int,
) -> int:
    """Swaps out lower-priority contexts until `pages` are freed (or none is left to swap);
    returns the pages freed."""
    candidates = [
        ctx
        for ctx in contexts.all_contexts()
        if ctx.owner != for_owner
        and priority_of(ctx.owner) < priority
        and ctx.swapped is None
        and ctx.pages
    ]
    candidates.sort(key=lambda ctx: (priority_of(ctx.owner), -len(ctx.pages)))
    freed = 0
    for ctx in candidates:
        if freed >= pages or contexts.swapped_pages + len(ctx.pages) > max_pages:
            break
        freed += contexts.swap_out(ctx, save)
    return freed
