"""Named exports: one inferlet publishes a context's pages so another can start from them.

The registry holds one reference per exported page in the pool (as the owner REGISTRY_OWNER), so
exported pages outlive the exporter's context; importers take their own references. Names are
per server (see the architecture's scaling notes).
"""

from __future__ import annotations

import builtins
import threading
from dataclasses import dataclass

from pie.control.errors import (
    ExportExistsError,
    ExportNotFoundError,
    InvalidRequestError,
    NotOwnerError,
)
from pie.control.page_pool import OwnerId, PagePool

REGISTRY_OWNER: OwnerId = -1  # the pool owner under which the registry holds exported pages


@dataclass(frozen=True, slots=True)
class Export:
    name: str
    owner: OwnerId  # the exporter: the only instance that may unexport
    pages: tuple[int, ...]
    length: int  # filled slots in `pages`


class ExportRegistry:
    """Export names -> shared, read-only page lists. Thread-safe."""

    def __init__(self, pool: PagePool) -> None:
        self._pool = pool
        self._lock = threading.Lock()
        self._exports: dict[str, Export] = {}

    def export(self, owner: OwnerId, name: str, pages: builtins.list[int], length: int) -> None:
        """Publish `pages` (holding `length` filled slots) under `name`.

        `owner` must hold every page. Raises ExportExistsError if the name is taken.
        """
        if not name:
            raise InvalidRequestError("an export needs a non-empty name")
        if length < 0:
            raise InvalidRequestError(f"an export's length cannot be negative, got {length}")
        with self._lock:
            if name in self._exports:
                raise ExportExistsError(
                    f"export {name!r} already exists; pick another name or unexport it first"
                )
            held = self._pool.owned(owner)
            foreign = [p for p in pages if p not in held]
            if foreign:
                raise NotOwnerError(
                    f"owner {owner} cannot export pages {foreign} it holds no reference on"
                )
            self._pool.retain(REGISTRY_OWNER, pages)
            self._exports[name] = Export(name, owner, tuple(pages), length)

    def import_(self, owner: OwnerId, name: str) -> tuple[builtins.list[int], int]:
        """`owner` takes a reference on the pages of export `name`; returns (pages, length)."""
        with self._lock:
            found = self._get(name)
            self._pool.retain(owner, found.pages)
            return builtins.list(found.pages), found.length

    def unexport(self, owner: OwnerId | None, name: str) -> None:
        """Withdraw `name`; only its exporter may (None: the server, which always may).

        The pages stay alive while importers still hold them.
        """
        with self._lock:
            found = self._get(name)
            if owner is not None and owner != found.owner:
                raise NotOwnerError(
                    f"export {name!r} was made by owner {found.owner}; only it may unexport it"
                )
            self._pool.release(REGISTRY_OWNER, found.pages)
            del self._exports[name]

    def unexport_owner(self, owner: OwnerId) -> builtins.list[str]:
        """Withdraw every export `owner` made (for servers that end exports with the instance)."""
        with self._lock:
            names = [e.name for e in self._exports.values() if e.owner == owner]
            for name in names:
                self._pool.release(REGISTRY_OWNER, self._exports.pop(name).pages)
            return names

    def get(self, name: str) -> Export:
        with self._lock:
            return self._get(name)

    def list(self) -> builtins.list[str]:
        """Export names, sorted."""
        with self._lock:
            return sorted(self._exports)

    def _get(self, name: str) -> Export:
        found = self._exports.get(name)
        if found is None:
            raise ExportNotFoundError(f"no export named {name!r}; list exports to see the names")
        return found
