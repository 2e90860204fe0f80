"""The client protocol's connection handler: one `Connection` per WebSocket.

Reads frames one at a time (each answered in order, errors as error frames, never a crash),
streams the events of the instances attached to it through one writer task, and on
disconnect cancels its instances that were not detached. Frames: `frames.py`; wire format:
docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from functools import partial
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from pie import __version__
from pie.runtime.errors import LaunchError
from pie.server import frames as f
from pie.server.auth import admission_error, bearer_token, is_loopback, peer_host
from pie.server.sessions import Event, InstanceChannel
from pie.server.state import ServerDraining, ServerState
from pie.server.uploads import PendingUpload, Uploads

log = logging.getLogger(__name__)
HELLO_TIMEOUT_S = 10.0  # a connection that has not said hello by then is closed
CLOSE_POLICY = 1008  # WebSocket close codes
CLOSE_GOING_AWAY = 1001


async def websocket_endpoint(websocket: WebSocket) -> None:
    await Connection(websocket.app.state.pie, websocket).run()


class Connection:
    def __init__(self, state: ServerState, websocket: WebSocket) -> None:
        self.state = state
        self.ws = websocket
        self.peer = peer_host(websocket.scope)
        self.header_token = bearer_token(websocket.scope["headers"])
        self.outbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.queued_bytes = 0
        self.authenticated = False
        self.closed = False
        self.channels: dict[int, InstanceChannel] = {}  # instances attached here
        self.uploads = Uploads(state)
        self.handlers: dict[type[f.Frame], Any] = {
            f.Hello: self.on_hello,
            f.Ping: self.on_ping,
            f.Info: self.on_info,
            f.List: self.on_list,
            f.Upload: self.on_upload,
            f.Chunk: self.on_chunk,
            f.Launch: self.on_launch,
            f.Attach: self.on_attach,
            f.Detach: self.on_detach,
            f.Send: self.on_send,
            f.SendBlob: self.on_send_blob,
            f.CloseInput: self.on_close_input,
            f.Terminate: self.on_terminate,
        }

    # ---- life ---------------------------------------------------------------------------------------
    async def run(self) -> None:
        await self.ws.accept()
        self.state.connections.add(self)
        self.state.metrics.connections.inc()
        writer = asyncio.create_task(self._write())
        try:
            if self.state.config.token is None and not is_loopback(self.peer):
                reason = admission_error(self.state.config, self.peer, None) or ""
                await self._refuse(f.FrameError("unauthorized", reason))
                return
            await self._read()
        finally:
            self._release_instances()
            self.closed = True
            self.outbox.put_nowait(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer, 5.0)
            with contextlib.suppress(Exception):
                await self.ws.close()
            self.state.connections.discard(self)
            self.state.metrics.connections.dec()

    async def _read(self) -> None:
        while True:
            timeout = None if self.authenticated else HELLO_TIMEOUT_S
            try:
                message = await asyncio.wait_for(self.ws.receive(), timeout)
            except TimeoutError:
                await self._refuse(
                    f.FrameError("unauthorized", f"no hello frame within {HELLO_TIMEOUT_S:.0f} s")
                )
                return
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is None:
                self.send(f.Error(id=None, code="bad_frame", message=_TEXT_FRAME))
                continue
            await self._serve(data)
            if self.closed:
                return

    async def _serve(self, data: bytes) -> None:
        frame: f.Frame | None = None
        try:
            limit = self.state.config.max_frame_bytes
            if len(data) > limit:
                raise f.FrameError(
                    "too_large", f"a frame of {len(data)} bytes is over max_frame_bytes ({limit})"
                )
            frame = f.decode_client(data)
            if not self.authenticated and not isinstance(frame, f.Hello):
                raise f.FrameError("out_of_order", "send a hello frame first", frame.id)
            reply = await self.handlers[type(frame)](frame)
            if reply is not None:
                self.send(reply)
        except f.FrameError as e:
            if e.frame_type is None and frame is not None:
                e.frame_type = frame.__struct_config__.tag  # type: ignore[assignment]
            self.state.metrics.errors.labels(f"frame_{e.code}").inc()
            if e.code == "unauthorized":
                await self._refuse(e)
            else:
                self.send(e.to_frame())
        except Exception as e:  # a server bug: this frame fails, the connection lives
            log.exception("client frame failed")
            self.state.metrics.errors.labels("internal").inc()
            frame_id = frame.id if frame is not None else None
            self.send(f.Error(id=frame_id, code="internal", message=f"server error: {e!r}"))

    async def _refuse(self, error: f.FrameError) -> None:
        """Sends the error, then closes the connection (policy violation)."""
        self.send(error.to_frame())
        self.closed = True
        self.outbox.put_nowait(None)
        await asyncio.sleep(0)  # let the writer send it first
        with contextlib.suppress(Exception):
            await self.ws.close(CLOSE_POLICY, error.code)

    def _release_instances(self) -> None:
        """The connection is gone: instances not detached end, their pages go back."""
        for channel in self.channels.values():
            channel.unbind()
            if not channel.detached:
                channel.cancel("the client disconnected")
                self.state.channels.remove(channel.instance_id)
        self.channels.clear()

    # ---- sending (loop thread; never blocks) ----------------------------------------------------------
    def send(self, frame: f.Frame) -> None:
        if self.closed:
            return
        data = f.encode(frame)
        self.queued_bytes += len(data)
        if self.queued_bytes > self.state.config.max_buffered_bytes:
            log.warning("client %s reads too slowly; closing its connection", self.peer)
            self.closed = True
            self.outbox.put_nowait(None)
            asyncio.get_running_loop().create_task(self._close_slow())
            return
        self.outbox.put_nowait(data)

    async def _close_slow(self) -> None:
        with contextlib.suppress(Exception):
            limit = self.state.config.max_buffered_bytes
            await self.ws.close(CLOSE_POLICY, f"more than {limit} bytes of events unread")

    async def _write(self) -> None:
        try:
            while (data := await self.outbox.get()) is not None:
                self.queued_bytes -= len(data)
                await self.ws.send_bytes(data)
        except Exception:  # the peer is gone; the reader sees the disconnect
            self.closed = True

    def _sink(self, channel: InstanceChannel, event: Event) -> None:
        self.send(
            f.EventFrame(
                id=channel.correlation,
                instance=event.instance,
                kind=event.kind,
                text=event.text,
                data=event.data,
                reason=event.reason,
            )
        )
        if event.kind in ("return", "error") and event.instance == channel.instance_id:
            self.channels.pop(channel.instance_id, None)
            self.state.channels.remove(channel.instance_id)
            channel.unbind()

    async def flush(self, timeout: float) -> None:
        """Waits (up to `timeout`) until every queued frame is written (used by the drain)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.queued_bytes > 0 and not self.closed and loop.time() < deadline:
            await asyncio.sleep(0.02)

    async def close(
        self, code: int = CLOSE_GOING_AWAY, reason: str = "server shutting down"
    ) -> None:
        self.closed = True
        self.outbox.put_nowait(None)
        with contextlib.suppress(Exception):
            await self.ws.close(code, reason)

    # ---- frames ---------------------------------------------------------------------------------------
    async def on_hello(self, frame: f.Hello) -> f.Frame:
        if self.authenticated:
            raise f.FrameError(
                "out_of_order", "hello was already said on this connection", frame.id
            )
        token = frame.token if frame.token is not None else self.header_token
        reason = admission_error(self.state.config, self.peer, token)
        if reason is not None:
            raise f.FrameError("unauthorized", reason, frame.id)
        self.authenticated = True
        config = self.state.config
        return f.Welcome(
            id=frame.id,
            server=f"pie-python {__version__}",
            protocol=f.PROTOCOL_VERSION,
            model=str(self.state.engine.model_name),
            max_frame_bytes=config.max_frame_bytes,
            upload_chunk_bytes=config.upload_chunk_bytes,
        )

    async def on_ping(self, frame: f.Ping) -> f.Frame:
        return f.Pong(id=frame.id)

    async def on_info(self, frame: f.Info) -> f.Frame:
        return f.ServerInfo(id=frame.id, info=self.state.info())

    async def on_list(self, frame: f.List) -> f.Frame:
        listed = [ch.summary() for ch in self.state.channels.all()]
        known = {item["instance"] for item in listed}
        for handle in self.state.runtime.instances():  # launched another way (the OpenAI API)
            if handle.id not in known:
                program = getattr(getattr(handle, "program", None), "name", "")
                listed.append(
                    {"instance": handle.id, "program": program, "running": True, "other": True}
                )
        return f.Instances(id=frame.id, instances=listed)

    async def on_upload(self, frame: f.Upload) -> f.Frame:
        return self.uploads.begin(frame)

    async def on_chunk(self, frame: f.Chunk) -> f.Frame:
        step = self.uploads.take_chunk(frame)
        if isinstance(step, PendingUpload):
            return await self.uploads.register(step, frame.id)
        return step

    async def on_launch(self, frame: f.Launch) -> f.Frame | None:
        state = self.state
        try:
            digest = state.runtime.program(frame.program).hash
        except LaunchError as e:
            raise f.FrameError("unknown_program", str(e), frame.id) from None
        loop = asyncio.get_running_loop()
        channel = InstanceChannel(loop, digest, frame.args, state.config.max_buffered_bytes)
        limits = dataclasses.replace(
            state.config.instance_limits(),
            kv_pages=frame.kv_pages,
            kv_reserve=frame.kv_reserve,
            priority=frame.priority,
        )
        if frame.http_hosts is not None:
            beyond = sorted(set(frame.http_hosts) - set(limits.http_hosts))
            if beyond:
                raise f.FrameError(
                    "launch_failed",
                    f"http_hosts {beyond} are not among those this server allows "
                    f"({list(limits.http_hosts)})",
                    frame.id,
                )
            limits = dataclasses.replace(limits, http_hosts=tuple(frame.http_hosts))
        if frame.mcp_servers is not None:
            granted = dict(limits.mcp_servers)
            beyond = sorted(set(frame.mcp_servers) - set(granted))
            if beyond:
                raise f.FrameError(
                    "launch_failed",
                    f"mcp_servers {beyond} are not among those this server's config names "
                    f"({sorted(granted)})",
                    frame.id,
                )
            narrowed = tuple((name, granted[name]) for name in sorted(set(frame.mcp_servers)))
            limits = dataclasses.replace(limits, mcp_servers=narrowed)
        try:
            handle = await asyncio.to_thread(
                partial(state.launch, digest, frame.args, channel, limits=limits)
            )
        except ServerDraining as e:
            raise f.FrameError("draining", str(e), frame.id) from None
        except LaunchError as e:
            raise f.FrameError("launch_failed", str(e), frame.id) from None
        channel.watch(handle)
        state.channels.add(channel)
        if frame.detached:
            channel.detached = True
        elif self.closed:  # the client left while the instance started
            channel.cancel("the client disconnected")
            state.channels.remove(channel.instance_id)
            return None
        self.send(f.Launched(id=frame.id, instance=channel.instance_id, program=digest))
        if frame.detached:
            channel.held = False  # its events wait in the backlog for an attach
        else:
            self.channels[channel.instance_id] = channel
            channel.bind(self, self._sink, frame.id)
        return None

    def _channel(
        self, instance: int, frame_id: int | None, attached: bool = True
    ) -> InstanceChannel:
        channel = self.state.channels.get(instance)
        if channel is None:
            raise f.FrameError(
                "unknown_instance",
                f"no instance {instance} here (never launched over this protocol, or ended)",
                frame_id,
            )
        if attached and channel.owner is not self:
            raise f.FrameError(
                "not_attached", f"instance {instance} is not attached to this connection", frame_id
            )
        return channel

    async def on_attach(self, frame: f.Attach) -> f.Frame | None:
        channel = self._channel(frame.instance, frame.id, attached=False)
        if channel.owner is not None and channel.owner is not self:
            raise f.FrameError(
                "attached_elsewhere",
                f"instance {frame.instance} is attached to another connection; detach it there",
                frame.id,
            )
        self.send(
            f.Attached(
                id=frame.id,
                instance=frame.instance,
                running=not channel.finished,
                dropped=channel.dropped,
            )
        )
        channel.dropped = 0
        self.channels[frame.instance] = channel
        channel.bind(self, self._sink, frame.id)
        return None

    async def on_detach(self, frame: f.Detach) -> f.Frame:
        channel = self._channel(frame.instance, frame.id)
        channel.detached = True
        channel.unbind()
        self.channels.pop(frame.instance, None)
        return f.Ok(id=frame.id)

    async def on_send(self, frame: f.Send) -> f.Frame:
        self._open_input(frame.instance, frame.id).put_text(frame.text)
        return f.Ok(id=frame.id)

    async def on_send_blob(self, frame: f.SendBlob) -> f.Frame:
        self._open_input(frame.instance, frame.id).put_blob(frame.data)
        return f.Ok(id=frame.id)

    async def on_close_input(self, frame: f.CloseInput) -> f.Frame:
        self._channel(frame.instance, frame.id).close_input()
        return f.Ok(id=frame.id)

    def _open_input(self, instance: int, frame_id: int | None) -> InstanceChannel:
        channel = self._channel(instance, frame_id)
        if channel.input_closed:
            raise f.FrameError(
                "input_closed",
                f"instance {instance}'s input was closed (close_input); it takes no more messages",
                frame_id,
            )
        return channel

    async def on_terminate(self, frame: f.Terminate) -> f.Frame:
        channel = self._channel(frame.instance, frame.id, attached=False)
        if channel.owner is not None and channel.owner is not self:
            raise f.FrameError(
                "attached_elsewhere",
                f"instance {frame.instance} is attached to another connection",
                frame.id,
            )
        channel.cancel("terminated by the client")
        return f.Ok(id=frame.id)


_TEXT_FRAME = "frames are binary WebSocket messages holding MessagePack, not text"
