"""The plane's side of KV snapshots: a context into the user's `SnapshotStore`, and back out.

`kv_save` takes the context's filled pages (shared copy-on-write, as a fork's), its length,
the host's record of its tokens and its hidden ranges; with a snapshot directory the pages' KV
is read on the engine thread after every copy queued before it (`BatchScheduler.read_pages`)
and written to disk. `kv_open` makes a new context of the opener on the snapshot's pages,
loading them from disk first when this process has not held them yet.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from pie.control.context import KvContext
from pie.control.page_pool import PagePool
from pie.control.snapshot_disk import SnapshotDisk
from pie.control.snapshots import SnapshotContent, SnapshotSettings, SnapshotStore, hidden_ranges
from pie.runtime.errors import HostError

if TYPE_CHECKING:
    from pie.runtime.plane.plane import ControlPlane

READ_TIMEOUT_S = 60.0  # a page read waits for the step in flight; more means a stuck engine


def snapshot_args(
    plane: ControlPlane, owner: int, ctx: KvContext, name: str, ttl_s: int | None
) -> tuple[Any, ...]:
    """The arguments of `SnapshotStore.save` for `ctx` saved as `name` by `owner`."""
    pages, length, tokens, hidden = plane.contexts.snapshot_of(ctx)
    content = SnapshotContent(
        length, None if tokens is None else tuple(tokens), hidden_ranges(hidden)
    )

    def read_pages(pages: list[int]) -> Any:
        future = plane.scheduler.read_pages(pages)
        try:
            return future.result(timeout=READ_TIMEOUT_S)
        except TimeoutError:
            raise HostError(
                f"reading the snapshot's pages took over {READ_TIMEOUT_S:.0f} s; try again"
            ) from None

    ttl = None if ttl_s is None else float(ttl_s)
    return plane.user_of(owner), name, pages, content, ttl, read_pages


def open_snapshot(plane: ControlPlane, owner: int, name: str) -> KvContext:
    """A new context of `owner` on the pages of its user's snapshot `name`."""
    opened = plane.snapshots.open(
        plane.user_of(owner), name, owner, load=plane.scheduler.queue_restore
    )
    content = opened.content
    hidden = np.zeros(content.length if content.hidden else 0, dtype=np.bool_)
    for start, end in content.hidden:
        hidden[start:end] = True
    tokens = None if content.tokens is None else list(content.tokens)
    return plane.contexts.open_pages(owner, opened.pages, content.length, tokens, hidden)


def snapshot_store(engine: Any, pool: PagePool, settings: SnapshotSettings) -> SnapshotStore:
    """The runtime's store: in memory, or over `settings.directory` for this engine."""
    disk = None if settings.directory is None else SnapshotDisk(settings.directory, engine)
    return SnapshotStore(pool, settings, disk=disk)
