"""SIGTERM with 50 running instances drains: no new launches, instances may finish within
the grace period, the rest end as cancelled, every client gets its last event, the process
exits 0 with the pool whole."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx
import pytest

from pie.client import InstanceError, PieClient, RemoteInstance, ServerError
from tests.server.conftest import ServerProcess, run

pytestmark = pytest.mark.slow
CONNECTIONS = 5
PER_CONNECTION = 10  # 50 in all


def test_sigterm_drains_50_running_instances(server_cache: Path, chatty_wasm: bytes) -> None:
    proc = ServerProcess(server_cache, "--drain-grace", "3")
    try:
        outcome = run(_drain_scenario(proc, chatty_wasm), timeout=240)
    finally:
        code = proc.stop(timeout=60)
    launched, running, refused, health, results = outcome
    assert launched == running == CONNECTIONS * PER_CONNECTION
    assert refused == "draining" and health == 503
    finished = [r for r in results if not isinstance(r, InstanceError)]
    cancelled = [r for r in results if isinstance(r, InstanceError)]
    assert finished.count("bye") == CONNECTIONS  # told to finish during the grace period
    assert len(finished) + len(cancelled) == launched
    for error in cancelled:
        assert error.reason == "cancelled" and "shutting down" in str(error), error
    assert code == 0, proc.log
    assert "pool whole: 320 of 320 KV pages free" in proc.lines[-1], proc.log


async def _drain_scenario(
    proc: ServerProcess, wasm: bytes
) -> tuple[int, int, str, int, list[str | InstanceError]]:
    clients = [await PieClient.connect(proc.url) for _ in range(CONNECTIONS)]
    program = await clients[0].upload(wasm)
    instances: list[list[RemoteInstance]] = []
    for client in clients:
        # Per connection: 5 waiting for a message, 4 holding KV pages, 1 generating at length.
        group = [await client.launch(program, ["echo"]) for _ in range(5)]
        group += [await client.launch(program, ["hold", "Pages held here"]) for _ in range(4)]
        group.append(await client.launch(program, ["stream", "5000", "Count to a million:"]))
        instances.append(group)
    running = (await clients[0].info())["instances"]
    proc.proc.send_signal(signal.SIGTERM)
    refused = ""
    for _ in range(100):  # the signal arrives within moments
        try:
            extra = await clients[0].launch(program, ["echo"])
            await extra.terminate()
            await asyncio.sleep(0.02)
        except ServerError as e:
            refused = e.code
            break
    health = httpx.get(proc.http + "/health", timeout=10).status_code
    for group in instances:
        await group[0].send("bye")  # one echo per connection finishes within the grace
    results = await asyncio.gather(*(_outcome(inst) for group in instances for inst in group))
    for client in clients:
        await client.close()
    return sum(map(len, instances)), int(running), refused, health, list(results)


async def _outcome(instance: RemoteInstance) -> str | InstanceError:
    try:
        return await instance.wait()
    except InstanceError as e:
        return e
