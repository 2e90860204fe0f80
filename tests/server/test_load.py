"""Load and disconnects over the client protocol: 200 inferlets at once all finish with the
pool whole; a client that drops mid-stream has its instances ended and their pages returned."""

from __future__ import annotations

import asyncio
import time

import pytest

from pie.client import PieClient
from tests.server.conftest import ServerProcess, run, wait_pool_whole

pytestmark = pytest.mark.slow
CONNECTIONS = 8
PER_CONNECTION = 25  # 200 instances in all, below the runtime's 256


def test_200_concurrent_inferlets_finish_with_the_pool_whole(
    server: ServerProcess, chatty: str
) -> None:
    async def one_connection(k: int) -> list[str]:
        async with PieClient.connect(server.url) as client:
            instances = [
                await client.launch(chatty, ["stream", "4", f"Story number {k}-{i}:"])
                for i in range(PER_CONNECTION)
            ]
            return list(await asyncio.gather(*(inst.wait() for inst in instances)))

    async def go() -> tuple[list[list[str]], dict[str, object], dict[str, object], float]:
        began = time.monotonic()
        results = await asyncio.gather(*(one_connection(k) for k in range(CONNECTIONS)))
        elapsed = time.monotonic() - began
        async with PieClient.connect(server.url) as client:
            pages = await wait_pool_whole(client)
            info = await client.info()
        return results, pages, info, elapsed

    results, pages, info, elapsed = run(go(), timeout=300)
    print(f"200 inferlets over {CONNECTIONS} connections: {elapsed:.1f} s")
    flat = [r for rs in results for r in rs]
    assert len(flat) == CONNECTIONS * PER_CONNECTION
    assert all(r.strip() for r in flat)  # each generated its 4 tokens of text
    assert pages["used"] == 0 and pages["free"] + pages["reusable"] == pages["total"] == 320
    scheduler = info["scheduler"]
    assert isinstance(scheduler, dict) and scheduler["mean_sequences_per_step"] > 1  # batched


def test_disconnect_mid_stream_returns_the_pages(server: ServerProcess, chatty: str) -> None:
    async def go() -> tuple[int, int, dict[str, object]]:
        client = await PieClient.connect(server.url)
        streaming = await client.launch(chatty, ["stream", "4000", "Tell me everything:"])
        holders = [
            await client.launch(chatty, ["hold", f"A long prompt that fills pages {i} " * 8])
            for i in range(4)
        ]
        for holder in holders:  # each has filled its context and waits for a message
            assert (await anext(holder.events())).kind == "message"
        async for event in streaming.events():  # mid-stream: a few tokens in
            if event.kind == "message" and event.text:
                break
        async with PieClient.connect(server.url) as observer:
            used_before = (await observer.info())["pages"]["used"]
            running_before = len([i for i in await observer.list() if i["running"]])
            await client.ws.close()  # no goodbye: the connection just ends
            pages = await wait_pool_whole(observer)
            while await observer.list():  # the cancelled instances leave the listing too
                await asyncio.sleep(0.05)
        return used_before, running_before, pages

    used_before, running_before, pages = run(go())
    assert used_before >= 5 and running_before == 5
    assert pages["used"] == 0 and pages["free"] + pages["reusable"] == pages["total"]
