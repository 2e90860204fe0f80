"""`PieClientSync`: the async client driven from plain code; its event loop runs in a thread."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from pie.client.connection import PieClient, RemoteInstance
from pie.server.frames import EventFrame

T = TypeVar("T")


class SyncInstance:
    """A `RemoteInstance` with blocking methods."""

    def __init__(self, client: PieClientSync, remote: RemoteInstance) -> None:
        self._client = client
        self.remote = remote
        self.id = remote.id

    def events(self) -> Iterator[EventFrame]:
        stream = self.remote.events()

        async def next_event() -> EventFrame | None:
            return await anext(stream, None)

        while (event := self._client._call(next_event())) is not None:
            yield event

    def wait(self, timeout: float | None = None) -> str:
        return self._client._call(self.remote.wait(), timeout)

    def send(self, text: str) -> None:
        self._client._call(self.remote.send(text))

    def send_blob(self, data: bytes) -> None:
        self._client._call(self.remote.send_blob(data))

    def close_input(self) -> None:
        self._client._call(self.remote.close_input())

    def terminate(self) -> None:
        self._client._call(self.remote.terminate())

    def detach(self) -> None:
        self._client._call(self.remote.detach())


class PieClientSync:
    """`with PieClientSync(url, token=...) as client: client.launch(...).wait()`."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="pie-client", daemon=True
        )
        self._thread.start()
        try:
            self.client: PieClient = self._call(PieClient._open(url, token, {}), timeout)
        except BaseException:
            self._stop()
            raise

    def _call(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout)
        except cf.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no answer from the server within {timeout} s") from None

    def upload(self, wasm: bytes, name: str | None = None) -> str:
        return self._call(self.client.upload(wasm, name))

    def launch(
        self, program: str, args: list[str] | None = None, *, detached: bool = False, **kw: Any
    ) -> SyncInstance:
        """`PieClient.launch`; `kw`: its kv_pages, kv_reserve, priority, http_hosts and mcp_servers."""
        launching = self.client.launch(program, args, detached=detached, **kw)
        return SyncInstance(self, self._call(launching))

    def attach(self, instance_id: int) -> SyncInstance:
        return SyncInstance(self, self._call(self.client.attach(instance_id)))

    def list(self) -> list[dict[str, Any]]:
        return self._call(self.client.list())

    def info(self) -> dict[str, Any]:
        return self._call(self.client.info())

    def close(self) -> None:
        if self._loop.is_running():
            self._call(self.client.close(), 10.0)
            self._stop()

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)

    def __enter__(self) -> PieClientSync:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
