"""Hypothesis-fuzzed frames never take the server down: random bytes, random MessagePack
maps, real frame types with wrong field types, wrong versions, oversized frames. Each
example gets an error frame (or a normal reply) on a connection that stays usable; a health
check follows each batch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from pie.server import frames as f
from tests.server.conftest import ServerProcess

pytestmark = pytest.mark.slow
MAX_FRAME = 1 << 20  # the shared server's max_frame_bytes
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same examples every run
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=40),
    st.binary(max_size=40),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)
frame_types = st.sampled_from(sorted(f.CLIENT_FRAMES))
FIELDS = "v id type token hash size offset data program args detached instance text name client"
field_names = st.sampled_from(FIELDS.split())
ERROR_CODES = {
    "bad_frame",
    "unsupported_version",
    "unknown_type",
    "out_of_order",
    "too_large",
    "unknown_program",
    "unknown_instance",
    "not_attached",
}


@pytest.fixture(scope="module")
def ws(server: ServerProcess) -> Iterator[ClientConnection]:
    with connect(server.url, compression=None, max_size=None) as conn:
        conn.send(f.encode(f.Hello(id=1)))
        assert msgspec.msgpack.decode(conn.recv(10))["type"] == "welcome"
        yield conn


def exchange(ws: ClientConnection, data: bytes) -> dict[str, Any]:
    """Sends one frame; its reply (any frame with an id, or an error), decoded."""
    ws.send(data)
    reply = msgspec.msgpack.decode(ws.recv(30))
    assert isinstance(reply, dict) and reply["v"] == 1 and "type" in reply
    return reply


def still_serving(ws: ClientConnection, server: ServerProcess) -> None:
    assert exchange(ws, f.encode(f.Ping(id=7)))["type"] == "pong"
    assert server.healthy()


SERVER_FRAMES = {"error", "pong", "welcome", "server_info", "instances", "upload_ready", "ok"}


def test_random_bytes(ws: ClientConnection, server: ServerProcess) -> None:
    @FUZZ
    @given(data=st.binary(max_size=300))
    def batch(data: bytes) -> None:
        assert exchange(ws, data)["type"] in SERVER_FRAMES

    batch()
    still_serving(ws, server)


def test_random_maps(ws: ClientConnection, server: ServerProcess) -> None:
    keys = st.one_of(field_names, st.text(max_size=8))

    @FUZZ
    @given(frame=st.dictionaries(keys, values, max_size=8))
    def batch(frame: dict[str, Any]) -> None:
        reply = exchange(ws, msgspec.msgpack.encode(frame))
        assert reply["type"] in SERVER_FRAMES
        if reply["type"] == "error":
            assert reply["code"] in ERROR_CODES and reply["message"]

    batch()
    still_serving(ws, server)


def test_real_types_with_wrong_fields(ws: ClientConnection, server: ServerProcess) -> None:
    @FUZZ
    @given(kind=frame_types, fields=st.dictionaries(field_names, values, max_size=6))
    def batch(kind: str, fields: dict[str, Any]) -> None:
        reply = exchange(ws, msgspec.msgpack.encode({**fields, "v": 1, "id": 5, "type": kind}))
        assert reply["id"] == 5
        if reply["type"] == "error":
            assert reply["code"] in ERROR_CODES and reply["frame_type"] == kind

    batch()
    still_serving(ws, server)


def test_wrong_versions(ws: ClientConnection, server: ServerProcess) -> None:
    @FUZZ
    @given(version=values.filter(lambda v: v != 1 or isinstance(v, bool | float)), kind=frame_types)
    def batch(version: Any, kind: str) -> None:
        reply = exchange(ws, msgspec.msgpack.encode({"v": version, "id": 3, "type": kind}))
        assert reply["type"] == "error" and reply["id"] == 3
        assert reply["code"] in ("unsupported_version", "bad_frame")

    batch()
    still_serving(ws, server)


def test_oversized_frames(ws: ClientConnection, server: ServerProcess) -> None:
    @settings(FUZZ, max_examples=12)
    @given(extra=st.integers(min_value=1, max_value=MAX_FRAME - 100))
    def batch(extra: int) -> None:
        chunk = f.Chunk(id=4, hash="0" * 64, offset=0, data=b"x" * (MAX_FRAME + extra))
        reply = exchange(ws, f.encode(chunk))
        assert reply["type"] == "error" and reply["code"] == "too_large"

    batch()
    still_serving(ws, server)


def test_past_the_transport_limit_the_connection_closes_but_the_server_lives(
    server: ServerProcess,
) -> None:
    with connect(server.url, compression=None, max_size=None) as conn:
        conn.send(f.encode(f.Hello(id=1)))
        conn.recv(10)
        with pytest.raises(ConnectionClosed) as closed:  # the close may cut the send short
            conn.send(b"\x00" * (2 * MAX_FRAME + 1))
            conn.recv(10)
        # 1009 when the close frame gets through; a reset can beat it to the client
        assert closed.value.rcvd is None or closed.value.rcvd.code == 1009
    assert server.healthy()
