"""`PageAdmission`: OpenAI requests wait in line, first come first served, for KV room."""

from __future__ import annotations

import asyncio

import pytest

from pie.server.admission import DEFAULT_OUTPUT_RESERVE, PageAdmission


def test_pages_cover_every_choice_and_are_capped_at_the_pool() -> None:
    admission = PageAdmission(capacity=100, page_size=16)
    assert admission.pages_for([10], 1, 6) == 1
    assert admission.pages_for([10], 1, 7) == 2
    assert admission.pages_for([16, 40], 2, 16) == 2 * 2 + 2 * 4
    assert admission.pages_for([10], 1, None) == -(-(10 + DEFAULT_OUTPUT_RESERVE) // 16)
    assert admission.pages_for([10], 1, 10_000) == 100


def test_requests_wait_in_order_and_a_release_admits_the_head() -> None:
    async def scenario() -> list[str]:
        admission = PageAdmission(capacity=10, page_size=16)
        order: list[str] = []

        async def request(name: str, pages: int) -> None:
            await admission.acquire(pages)
            order.append(name)

        await request("a", 6)
        waiting = [asyncio.create_task(request(n, p)) for n, p in (("b", 6), ("c", 1))]
        await asyncio.sleep(0.01)
        # "c" would fit, but first come first served: nobody passes the line's head
        assert order == ["a"] and admission.waiting == 2 and admission.reserved == 6
        admission.release(6)
        await asyncio.gather(*waiting)
        assert admission.reserved == 7 and admission.waiting == 0
        return order

    assert asyncio.run(scenario()) == ["a", "b", "c"]


def test_a_request_that_leaves_the_line_lets_the_next_in() -> None:
    async def scenario() -> None:
        admission = PageAdmission(capacity=10, page_size=16)
        await admission.acquire(8)
        big = asyncio.create_task(admission.acquire(9))
        small = asyncio.create_task(admission.acquire(2))
        await asyncio.sleep(0.01)
        assert not small.done()  # behind the big one
        big.cancel()
        with pytest.raises(asyncio.CancelledError):
            await big
        await asyncio.wait_for(small, 1)
        assert admission.reserved == 10 and admission.waiting == 0

    asyncio.run(scenario())


def test_release_from_another_thread_wakes_the_line() -> None:
    async def scenario() -> None:
        admission = PageAdmission(capacity=4, page_size=16)
        await admission.acquire(4)
        second = asyncio.create_task(admission.acquire(4))
        await asyncio.sleep(0.01)
        await asyncio.to_thread(admission.release, 4)  # as an instance's done callback does
        await asyncio.wait_for(second, 1)
        assert admission.reserved == 4

    asyncio.run(scenario())
