"""The client protocol's frames: msgspec structs, the codec, and validation with errors that
name what was wrong. The wire format is documented in docs/protocol.md.

Every frame is a MessagePack map with `v` (protocol version), `id` (correlation id, chosen by
the client; replies and events carry the id of the request they answer) and `type`.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

PROTOCOL_VERSION = 1
MAX_ARGS = 1024  # launch arguments per instance

Id = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
InstanceId = Annotated[int, msgspec.Meta(ge=1, le=2**53)]
Hash = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
Size = Annotated[int, msgspec.Meta(ge=0, le=2**53)]


class Frame(msgspec.Struct, kw_only=True, tag_field="type"):
    v: int = PROTOCOL_VERSION
    id: Id | None = 0


# ---- client -> server -------------------------------------------------------------------------------
class Hello(Frame, tag="hello"):
    token: str | None = None
    client: str = ""


class Ping(Frame, tag="ping"):
    pass


class Info(Frame, tag="info"):
    pass


class List(Frame, tag="list"):
    pass


class Upload(Frame, tag="upload"):
    hash: Hash
    size: Size
    name: str | None = None


class Chunk(Frame, tag="chunk"):
    hash: Hash
    offset: Size
    data: bytes


class Launch(Frame, tag="launch"):
    program: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    args: Annotated[list[str], msgspec.Meta(max_length=MAX_ARGS)] = msgspec.field(
        default_factory=list
    )
    detached: bool = False
    # KV pages: the most it may hold (None: the server's default share), and how many are set
    # aside for it at launch (a claimed budget; the launch fails if the pool cannot).
    kv_pages: Annotated[int, msgspec.Meta(ge=1)] | None = None
    kv_reserve: Annotated[int, msgspec.Meta(ge=0)] = 0
    # Rank when the pool is short: higher waits less and may swap lower ones' pages out.
    priority: Annotated[int, msgspec.Meta(ge=-100, le=100)] = 0
    # Hosts it may reach over HTTP: some of those the server allows (None: all of them).
    http_hosts: Annotated[list[str], msgspec.Meta(max_length=64)] | None = None
    # MCP servers it may use, by name: some of those the server's config names (None: all).
    mcp_servers: Annotated[list[str], msgspec.Meta(max_length=64)] | None = None


class Attach(Frame, tag="attach"):
    instance: InstanceId


class Detach(Frame, tag="detach"):
    instance: InstanceId


class Send(Frame, tag="send"):
    instance: InstanceId
    text: str


class SendBlob(Frame, tag="send_blob"):
    instance: InstanceId
    data: bytes


class CloseInput(Frame, tag="close_input"):
    """No more `send` / `send_blob` for this instance: its receives end with end-of-input."""

    instance: InstanceId


class Terminate(Frame, tag="terminate"):
    instance: InstanceId


CLIENT_FRAMES: dict[str, type[Frame]] = {
    cls.__struct_config__.tag: cls  # type: ignore[misc]
    for cls in (
        Hello,
        Ping,
        Info,
        List,
        Upload,
        Chunk,
        Launch,
        Attach,
        Detach,
        Send,
        SendBlob,
        CloseInput,
        Terminate,
    )
}


# ---- server -> client -------------------------------------------------------------------------------
class Welcome(Frame, tag="welcome"):
    server: str
    protocol: int
    model: str
    max_frame_bytes: int
    upload_chunk_bytes: int


class Pong(Frame, tag="pong"):
    pass


class ServerInfo(Frame, tag="server_info"):
    info: dict[str, Any]


class Instances(Frame, tag="instances"):
    instances: list[dict[str, Any]]


class UploadReady(Frame, tag="upload_ready"):
    hash: str
    have: bool  # true: the server has this program; send no chunks
    chunk_bytes: int


class UploadProgress(Frame, tag="upload_progress"):
    hash: str
    received: int


class Uploaded(Frame, tag="uploaded"):
    hash: str
    name: str


class Launched(Frame, tag="launched"):
    instance: int
    program: str  # the program's hash


class Attached(Frame, tag="attached"):
    instance: int
    running: bool
    dropped: int  # events dropped from the backlog while nobody was attached


class Ok(Frame, tag="ok"):
    pass


class EventFrame(Frame, tag="event"):
    instance: int
    kind: str  # stdout | stderr | message | blob | return | error
    text: str | None = None
    data: bytes | None = None
    reason: str | None = None  # error events: failed | cancelled


class Error(Frame, tag="error"):
    code: str
    message: str
    frame_type: str | None = None  # the type of the offending frame, when it had one


class FrameError(Exception):
    """A frame that cannot be served; becomes an error frame with `code` and the message."""

    def __init__(
        self, code: str, message: str, frame_id: int | None = None, frame_type: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.frame_id = frame_id
        self.frame_type = frame_type

    def to_frame(self) -> Error:
        return Error(
            id=self.frame_id, code=self.code, message=str(self), frame_type=self.frame_type
        )


_BINARY_FIELDS = {"chunk": ("data",), "send_blob": ("data",)}
_encoder = msgspec.msgpack.Encoder()


def encode(frame: Frame) -> bytes:
    return _encoder.encode(frame)


def decode_client(data: bytes) -> Frame:
    """One client frame, validated; raises FrameError naming the first thing wrong."""
    try:
        raw = msgspec.msgpack.decode(data)
    except msgspec.DecodeError as e:
        raise FrameError("bad_frame", f"not a MessagePack value: {e}") from None
    if not isinstance(raw, dict):
        raise FrameError(
            "bad_frame",
            f"a frame is a MessagePack map with v, id and type, got {type(raw).__name__}",
        )
    frame_id = raw.get("id")
    if frame_id is not None and (
        not isinstance(frame_id, int) or isinstance(frame_id, bool) or not 0 <= frame_id <= 2**53
    ):
        raise FrameError("bad_frame", f"id must be an integer 0..2^53 or nil, got {frame_id!r}")
    kind = raw.get("type")
    kind_name = kind if isinstance(kind, str) else None
    version = raw.get("v")
    if version != PROTOCOL_VERSION:
        raise FrameError(
            "unsupported_version",
            f"this server speaks protocol version {PROTOCOL_VERSION}, the frame says {version!r}",
            frame_id,
            kind_name,
        )
    cls = CLIENT_FRAMES.get(kind_name) if kind_name is not None else None
    if cls is None:
        raise FrameError(
            "unknown_type",
            f"unknown frame type {kind!r}; known: {', '.join(sorted(CLIENT_FRAMES))}",
            frame_id,
            kind_name,
        )
    for name in _BINARY_FIELDS.get(kind_name or "", ()):
        # msgspec would take a base64 string for bytes; the protocol wants MessagePack bin.
        if name in raw and not isinstance(raw[name], bytes):
            raise FrameError(
                "bad_frame",
                f"{kind} frame: {name} must be MessagePack bin (bytes), got {type(raw[name]).__name__}",
                frame_id,
                kind_name,
            )
    try:
        return msgspec.convert(raw, cls)
    except msgspec.ValidationError as e:
        raise FrameError("bad_frame", f"{kind} frame: {e}", frame_id, kind_name) from None
