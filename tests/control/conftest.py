"""Fixtures for control tests: tiny pools checked for integrity after every test, and a full
stack (fake engine, pool, exports, scheduler, contexts) stopped cleanly after it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fake_engine import Bench, FakeEngine, Stack, build_bench, build_stack

from pie.control import BatchScheduler, PagePool


@pytest.fixture
def checked() -> Iterator[Callable[[PagePool], PagePool]]:
    """Register a pool; after the test its bookkeeping must still be whole."""
    pools: list[PagePool] = []

    def register(pool: PagePool) -> PagePool:
        pools.append(pool)
        return pool

    yield register
    for pool in pools:
        pool.check_integrity()


@pytest.fixture
def make_bench(checked: Callable[[PagePool], PagePool]) -> Callable[..., Bench]:
    """Contexts without a scheduler: page size 4 on an 11-page pool unless told otherwise."""

    def make(num_pages: int = 11, page_size: int = 4) -> Bench:
        bench = build_bench(num_pages, page_size)
        checked(bench.pool)
        return bench

    return make


@pytest.fixture
def make_stack(checked: Callable[[PagePool], PagePool]) -> Iterator[Callable[..., Stack]]:
    """A control stack over a FakeEngine; not started, so tests can queue work first."""
    stacks: list[Stack] = []

    def make(
        num_pages: int = 32, page_size: int = 4, poison: int | None = None, **scheduler_args: Any
    ) -> Stack:
        engine = FakeEngine(num_pages=num_pages, page_size=page_size, poison=poison)
        stack = build_stack(engine, BatchScheduler(engine, **scheduler_args))
        stacks.append(stack)
        checked(stack.pool)
        return stack

    yield make
    for stack in stacks:
        stack.engine.release()
        stack.scheduler.stop()
