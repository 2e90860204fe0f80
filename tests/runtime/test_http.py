"""Outgoing HTTP from inferlets: allowed hosts only, asynchronous, bounded, and every failure
of a tool server an error the program can handle (never a hung instance)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pie.runtime.limits import InstanceLimits
from pie.runtime.runtime import Runtime

pytestmark = pytest.mark.slow


class ToolServer(ThreadingHTTPServer):
    """A loopback server whose paths misbehave on purpose; counts requests in flight."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.running = self.most = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: ToolServer

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.running += 1
            self.server.most = max(self.server.most, self.server.running)
        try:
            self._answer()
        finally:
            with self.server.lock:
                self.server.running -= 1

    def _answer(self) -> None:
        if self.path == "/garbage":  # not HTTP at all
            self.wfile.write(b"\x00\x01 this is not a status line\r\n\r\n")
            return
        if self.path == "/hang":
            time.sleep(5)
        if self.path == "/slow":
            time.sleep(0.3)
        status, body = {"/fail": (500, b"boom"), "/big": (200, b"x" * 100_000)}.get(
            self.path, (200, b"hello from the tool")
        )
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def tools() -> Iterator[ToolServer]:
    server = ToolServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


@pytest.mark.parametrize("native", [False, True], ids=["wasm", "native"])
def test_async_tools_decodes_while_its_tool_call_is_in_flight(
    runtime: Runtime, tools: ToolServer, native: bool
) -> None:
    from tests.runtime.conftest import ROOT

    name = f"async-tools-{native}"
    if not runtime.has_program(name):
        runtime.add_source(ROOT / "inferlets" / "async_tools.py", name=name, native=native)
    with socket.socket() as s:  # a port nothing listens on: the tool is down
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}/"
    for url, seen in (
        (tools.url + "/slow", "tool status 200: hello from the tool"),
        (down, "tool failed"),
    ):
        done = runtime.launch(name, [url, "hi"], native=native)
        out = json.loads(done.wait(60))
        assert out["tokens_while_waiting"] >= 1  # the model wrote while the request ran
        assert seen in out["observation"] and out["answer"]


def _fetch(runtime: Runtime, args: list[str], native: bool, **limits: object) -> dict[str, object]:
    program = "probe-native" if native else "probe"
    launched = runtime.launch(
        program,
        args,
        native=native,
        limits=InstanceLimits(**limits) if limits else None,  # type: ignore[arg-type]
    )
    return dict(json.loads(launched.wait(30)))


@pytest.mark.parametrize("native", [False, True], ids=["wasm", "native"])
def test_an_inferlet_calls_a_loopback_tool(
    runtime: Runtime, tools: ToolServer, native: bool
) -> None:
    assert _fetch(runtime, ["fetch", tools.url + "/ok"], native) == {
        "status": 200,
        "body": "hello from the tool",
    }
    # A 500 is a response the program reads, not an error.
    assert _fetch(runtime, ["fetch", tools.url + "/fail"], native) == {
        "status": 500,
        "body": "boom",
    }


def test_tool_failures_are_errors_the_program_handles(runtime: Runtime, tools: ToolServer) -> None:
    began = time.monotonic()
    hung = _fetch(runtime, ["fetch", tools.url + "/hang", "0.3"], False)
    assert "timed out after 0.3 s" in str(hung["error"]) and time.monotonic() - began < 3
    garbage = _fetch(runtime, ["fetch", tools.url + "/garbage"], False)
    assert "failed" in str(garbage["error"])
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/"
    assert "ConnectError" in str(_fetch(runtime, ["fetch", closed], False)["error"])
    big = _fetch(runtime, ["fetch", tools.url + "/big"], False, max_message_bytes=50_000)
    assert "passed 50000 bytes" in str(big["error"])


def test_hosts_outside_the_allowlist_are_refused(runtime: Runtime, tools: ToolServer) -> None:
    refused = _fetch(runtime, ["fetch", "http://example.com/"], False)
    assert "host 'example.com' is not allowed" in str(refused["error"])
    assert "http_hosts" in str(refused["error"])
    none = _fetch(runtime, ["fetch", tools.url + "/ok"], False, http_hosts=())
    assert "not allowed" in str(none["error"])
    assert "only http and https" in str(
        _fetch(runtime, ["fetch", "file:///etc/passwd"], False)["error"]
    )


def test_requests_run_concurrently_up_to_the_cap(runtime: Runtime, tools: ToolServer) -> None:
    tools.most = 0
    assert _fetch(runtime, ["fetch-many", tools.url + "/slow", "4"], False) == {
        "statuses": [200] * 4
    }
    assert tools.most >= 2  # in flight together, not one after another
    capped = _fetch(runtime, ["fetch-many", tools.url + "/slow", "3"], False, http_in_flight=2)
    assert "at most 2 at once" in str(capped["error"])
