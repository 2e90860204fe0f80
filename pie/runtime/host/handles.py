"""Per-instance handle tables: every model, context, future, decoder, logits row and subscription
an instance holds, so the host can check each handle it is given and release all at the end.

One id space across kinds (ids are never reused within an instance), so a stale id or an id of
the wrong kind gets a precise error instead of silently naming another object.
"""

from __future__ import annotations

import threading
from typing import Any

from pie.runtime.errors import HostError


class HandleTable:
    """Handles of one instance; `limit` caps how many may be open at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._next = 1
        self._items: dict[int, tuple[str, Any]] = {}
        # The instance thread is the only caller, except `drain` at cleanup and readers of
        # `count` (metrics): a lock keeps those consistent.
        self._lock = threading.Lock()

    def add(self, kind: str, obj: Any) -> int:
        with self._lock:
            if len(self._items) >= self.limit:
                raise HostError(
                    f"open-handle limit reached ({self.limit}): close contexts, take or discard "
                    "futures and finish decoders you no longer need"
                )
            handle = self._next
            self._next += 1
            self._items[handle] = (kind, obj)
            return handle

    def get(self, kind: str, handle: int) -> Any:
        entry = self._items.get(handle)
        if entry is None:
            raise HostError(
                f"{kind} handle {handle} is not open in this inferlet (never made, or already "
                "closed/taken)"
            )
        if entry[0] != kind:
            raise HostError(f"handle {handle} is a {entry[0]}, not a {kind}")
        return entry[1]

    def pop(self, kind: str, handle: int) -> Any:
        obj = self.get(kind, handle)
        with self._lock:
            del self._items[handle]
        return obj

    def of_kind(self, kind: str) -> list[tuple[int, Any]]:
        with self._lock:
            return [(h, obj) for h, (k, obj) in self._items.items() if k == kind]

    def values(self, kind: str) -> list[Any]:
        """The open objects of `kind`."""
        with self._lock:
            return [obj for k, obj in self._items.values() if k == kind]

    def drain(self) -> list[tuple[str, Any]]:
        """Removes and returns every open handle (kind, object), newest first."""
        with self._lock:
            items = [self._items[h] for h in sorted(self._items, reverse=True)]
            self._items.clear()
            return items

    def __len__(self) -> int:
        return len(self._items)
