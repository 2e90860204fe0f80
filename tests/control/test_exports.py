"""ExportRegistry: exported pages outlive their exporter; importers share them by reference."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pie.control import (
    ExportExistsError,
    ExportNotFoundError,
    ExportRegistry,
    NotOwnerError,
    PagePool,
    QuotaExceededError,
)


@pytest.fixture
def pool(checked: Callable[[PagePool], PagePool]) -> PagePool:
    return checked(PagePool(8))


@pytest.fixture
def registry(pool: PagePool) -> ExportRegistry:
    return ExportRegistry(pool)


def test_pages_live_after_the_exporter_frees_them(pool: PagePool, registry: ExportRegistry) -> None:
    pages = pool.allocate(1, 3)
    registry.export(1, "system-prompt", pages, 10)
    pool.release(1, pages)  # the exporter closed its context
    assert [pool.refcount(p) for p in pages] == [1, 1, 1]
    assert pool.used_count == 3
    assert registry.import_(2, "system-prompt") == ([0, 1, 2], 10)
    assert [pool.refcount(p) for p in pages] == [2, 2, 2]
    registry.unexport(1, "system-prompt")
    assert registry.list() == []
    assert [pool.refcount(p) for p in pages] == [1, 1, 1]  # the importer still holds them
    assert pool.release(2, pages) == [0, 1, 2]  # last holder frees
    assert pool.free_count == 8


def test_name_collision_retains_nothing(pool: PagePool, registry: ExportRegistry) -> None:
    a, b = pool.allocate(1, 1), pool.allocate(2, 1)
    registry.export(1, "x", a, 3)
    with pytest.raises(ExportExistsError, match="'x' already exists"):
        registry.export(2, "x", b, 3)
    assert pool.refcount(b[0]) == 1
    assert registry.get("x").owner == 1


def test_only_the_exporter_may_unexport(pool: PagePool, registry: ExportRegistry) -> None:
    registry.export(1, "x", pool.allocate(1, 2), 5)
    with pytest.raises(NotOwnerError, match="only it may unexport"):
        registry.unexport(2, "x")
    assert registry.list() == ["x"]
    registry.unexport(None, "x")  # the server may
    with pytest.raises(ExportNotFoundError):
        registry.unexport(1, "x")


def test_cannot_export_pages_not_held(pool: PagePool, registry: ExportRegistry) -> None:
    mine, theirs = pool.allocate(1, 1), pool.allocate(2, 1)
    with pytest.raises(NotOwnerError):
        registry.export(1, "x", mine + theirs, 5)
    assert registry.list() == [] and pool.refcount(mine[0]) == 1


def test_import_unknown_name_and_over_quota(pool: PagePool, registry: ExportRegistry) -> None:
    with pytest.raises(ExportNotFoundError, match="no export named 'nope'"):
        registry.import_(2, "nope")
    registry.export(1, "x", pool.allocate(1, 3), 12)
    pool.set_quota(2, 2)
    with pytest.raises(QuotaExceededError):
        registry.import_(2, "x")
    assert pool.owned(2) == {}


def test_list_and_unexport_owner(pool: PagePool, registry: ExportRegistry) -> None:
    registry.export(1, "b", pool.allocate(1, 1), 1)
    registry.export(1, "a", pool.allocate(1, 1), 1)
    registry.export(2, "c", pool.allocate(2, 1), 1)
    assert registry.list() == ["a", "b", "c"]
    assert sorted(registry.unexport_owner(1)) == ["a", "b"]
    assert registry.list() == ["c"]
    assert pool.release_owner(1) == 2
