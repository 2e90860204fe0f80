"""`PieClient`: the async client of the server's WebSocket protocol; `RemoteInstance`: one
launched (or attached) instance, its event stream, messages and result."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Generator
from typing import Any, Union
from urllib.parse import urlsplit, urlunsplit

import msgspec
from websockets.asyncio.client import ClientConnection, connect

from pie.client.errors import ConnectionLost, InstanceError, ServerError
from pie.server import frames as f

ServerFrame = Union[  # noqa: UP007 (msgspec needs a real Union of the tagged structs)
    f.Welcome,
    f.Pong,
    f.ServerInfo,
    f.Instances,
    f.UploadReady,
    f.UploadProgress,
    f.Uploaded,
    f.Launched,
    f.Attached,
    f.Ok,
    f.EventFrame,
    f.Error,
]
_decoder = msgspec.msgpack.Decoder(ServerFrame)
UPLOAD_WINDOW = 4  # chunks in flight during an upload
_END = None  # marks the end of an instance's event queue


def websocket_url(url: str) -> str:
    """`http://host:port`, `host:port` or `ws://host:port` -> `ws://host:port/ws`."""
    if "://" not in url:
        url = "ws://" + url
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path if parts.path not in ("", "/") else "/ws"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


class RemoteInstance:
    """An instance on the server. Its events arrive in order; `return` or `error` is last."""

    def __init__(self, client: PieClient, correlation: int) -> None:
        self.client = client
        self.correlation = correlation
        self.id = 0
        self.program = ""
        self.result: str | None = None
        self.error: InstanceError | None = None
        self._queue: asyncio.Queue[f.EventFrame | None] = asyncio.Queue()
        self._ended = False

    async def events(self) -> AsyncIterator[f.EventFrame]:
        """Every event until the instance ends (the final `return` or `error` included)."""
        while not self._ended:
            event = await self._queue.get()
            if event is None:
                self._ended = True
                if self.error is None and self.result is None:
                    self.error = InstanceError(self.id, "the connection closed", "lost")
                return
            if event.instance == self.id and event.kind in ("return", "error"):
                self._ended = True
                if event.kind == "return":
                    self.result = event.text or ""
                else:
                    self.error = InstanceError(self.id, event.text or "", event.reason)
            yield event

    async def wait(self) -> str:
        """The result, after consuming the remaining events; raises InstanceError."""
        async for _ in self.events():
            pass
        if self.error is not None:
            raise self.error
        return self.result or ""

    async def send(self, text: str) -> None:
        await self.client.request(f.Send(instance=self.id, text=text))

    async def send_blob(self, data: bytes) -> None:
        await self.client.request(f.SendBlob(instance=self.id, data=bytes(data)))

    async def close_input(self) -> None:
        """No more messages: once the instance has received those sent before, its
        `receive()` raises `EndOfInput` (its `messages()` ends)."""
        await self.client.request(f.CloseInput(instance=self.id))

    async def terminate(self) -> None:
        await self.client.request(f.Terminate(instance=self.id))

    async def detach(self) -> None:
        """The instance keeps running without this connection; attach to it later by id."""
        await self.client.request(f.Detach(instance=self.id))
        self.client._streams.pop(self.correlation, None)
        self._queue.put_nowait(_END)

    def _push(self, event: f.EventFrame | None) -> None:
        self._queue.put_nowait(event)


class PieClient:
    """One connection to a Pie server. Use `async with PieClient.connect(url) as client`."""

    def __init__(self, websocket: ClientConnection) -> None:
        self.ws = websocket
        self.welcome: f.Welcome | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._streams: dict[int, RemoteInstance] = {}
        self._reader: asyncio.Task[None] | None = None
        self._closed: BaseException | None = None

    @classmethod
    def connect(cls, url: str, token: str | None = None, **options: Any) -> _Connecting:
        """Connects and says hello; awaitable, or an async context manager that closes."""
        return _Connecting(cls._open(url, token, options))

    @classmethod
    async def _open(cls, url: str, token: str | None, options: dict[str, Any]) -> PieClient:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        options.setdefault("max_size", 64 * 2**20)
        options.setdefault("compression", None)  # frames are small or already dense (wasm)
        ws = await connect(websocket_url(url), additional_headers=headers, **options)
        client = cls(ws)
        client._reader = asyncio.create_task(client._read())
        try:
            client.welcome = await client.request(f.Hello(token=token, client="pie.client"))
        except BaseException:
            await client.close()
            raise
        return client

    async def close(self) -> None:
        await self.ws.close()
        if self._reader is not None:
            with contextlib.suppress(BaseException):
                await self._reader

    async def __aenter__(self) -> PieClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- requests -----------------------------------------------------------------------------------
    async def request(self, frame: f.Frame) -> Any:
        """Sends `frame` and returns the reply frame; raises ServerError on an error frame."""
        return await self._reply_of(await self._send(frame))

    async def _send(self, frame: f.Frame) -> asyncio.Future[Any]:
        """Sends `frame` (a fresh id unless it has one); the future resolves with its reply."""
        if self._closed is not None:
            raise ConnectionLost(f"the connection is closed: {self._closed}")
        if not frame.id:
            frame.id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[frame.id] = future
        try:
            await self.ws.send(f.encode(frame))
        except Exception as e:
            self._pending.pop(frame.id, None)
            raise ConnectionLost(f"could not send to the server: {e!r}") from None
        return future

    async def _reply_of(self, future: asyncio.Future[Any]) -> Any:
        reply = await future
        if isinstance(reply, f.Error):
            raise ServerError(reply.code, reply.message)
        return reply

    async def upload(self, wasm: bytes, name: str | None = None) -> str:
        """Uploads a component (skipped when the server has its hash); returns its hash."""
        digest = hashlib.sha256(wasm).hexdigest()
        ready = await self.request(f.Upload(hash=digest, size=len(wasm), name=name))
        if ready.have:
            return digest
        step = ready.chunk_bytes
        in_flight: list[asyncio.Future[Any]] = []
        last: Any = None
        for offset in range(0, len(wasm), step):
            chunk = f.Chunk(hash=digest, offset=offset, data=wasm[offset : offset + step])
            in_flight.append(await self._send(chunk))
            if len(in_flight) >= UPLOAD_WINDOW:
                last = await self._reply_of(in_flight.pop(0))
        for future in in_flight:
            last = await self._reply_of(future)
        return str(last.hash)

    async def launch(
        self,
        program: str,
        args: list[str] | None = None,
        *,
        detached: bool = False,
        kv_pages: int | None = None,
        kv_reserve: int = 0,
        priority: int = 0,
        http_hosts: list[str] | None = None,
        mcp_servers: list[str] | None = None,
    ) -> RemoteInstance:
        """Starts `program` (hash or name); its events stream unless `detached`. `kv_pages`
        caps its KV pages, `kv_reserve` claims that many up front, `priority` ranks it when
        the pool is short (docs/api.md, "Sharing the KV pool"); `http_hosts` narrows the hosts
        it may reach over HTTP, `mcp_servers` the MCP servers (by config name) it may use."""
        frame = f.Launch(
            program=program,
            args=list(args or []),
            detached=detached,
            kv_pages=kv_pages,
            kv_reserve=kv_reserve,
            priority=priority,
            http_hosts=http_hosts,
            mcp_servers=mcp_servers,
        )
        # Registered before the reply comes: the instance's events follow it at once.
        frame.id = next(self._ids)
        instance = RemoteInstance(self, frame.id)
        if not detached:
            self._streams[frame.id] = instance
        try:
            reply = await self._reply_of(await self._send(frame))
        except BaseException:
            self._streams.pop(frame.id, None)
            raise
        instance.id, instance.program = reply.instance, reply.program
        return instance

    async def attach(self, instance_id: int) -> RemoteInstance:
        """Streams a (detached) instance's events to this connection, its backlog first."""
        frame = f.Attach(instance=instance_id)
        frame.id = next(self._ids)
        instance = RemoteInstance(self, frame.id)
        instance.id = instance_id
        self._streams[frame.id] = instance
        try:
            await self._reply_of(await self._send(frame))
        except BaseException:
            self._streams.pop(frame.id, None)
            raise
        return instance

    async def list(self) -> list[dict[str, Any]]:
        reply = await self.request(f.List())
        return list(reply.instances)

    async def info(self) -> dict[str, Any]:
        """The model, the KV pool (pages used/free/total) and the scheduler's stats."""
        reply = await self.request(f.Info())
        return dict(reply.info)

    async def ping(self) -> None:
        await self.request(f.Ping())

    # ---- the reader task ------------------------------------------------------------------------------
    async def _read(self) -> None:
        reason: BaseException = ConnectionLost("the server closed the connection")
        try:
            async for data in self.ws:
                if isinstance(data, str):
                    continue
                frame = _decoder.decode(data)
                if isinstance(frame, f.EventFrame):
                    stream = self._streams.get(frame.id or 0)
                    if stream is not None:
                        stream._push(frame)
                        if frame.instance == stream.id and frame.kind in ("return", "error"):
                            self._streams.pop(frame.id or 0, None)
                    continue
                future = self._pending.pop(frame.id or 0, None)
                if future is not None and not future.done():
                    future.set_result(frame)
                elif isinstance(frame, f.Error):  # not an answer: the server is closing on us
                    reason = ServerError(frame.code, frame.message)
        except Exception as e:
            reason = ConnectionLost(f"the connection failed: {e!r}")
        finally:
            self._closed = reason
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(reason)
            self._pending.clear()
            for stream in self._streams.values():
                stream._push(_END)
            self._streams.clear()


class _Connecting:
    """`await PieClient.connect(...)` or `async with PieClient.connect(...) as client`."""

    def __init__(self, opening: Awaitable[PieClient]) -> None:
        self._opening = opening
        self._client: PieClient | None = None

    def __await__(self) -> Generator[Any, None, PieClient]:
        return self._opening.__await__()

    async def __aenter__(self) -> PieClient:
        self._client = await self._opening
        return self._client

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.close()
