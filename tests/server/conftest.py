"""Fixtures for server tests: a real `pie serve` subprocess on a free port (embedded model,
small KV pool), the test inferlet built once per session, and small client helpers.

Builds take 5-7 s and compiling a component ~7 s, so both happen once per session into a
session-wide PIE_CACHE_DIR that every server started here shares.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from pie.client import PieClient

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CHATTY = HERE / "inferlets" / "chatty.py"
KV_PAGES = 320
T = TypeVar("T")


@pytest.fixture(scope="session")
def server_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("pie-server-cache")
    old = os.environ.get("PIE_CACHE_DIR")
    os.environ["PIE_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("PIE_CACHE_DIR", None)
    else:
        os.environ["PIE_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def chatty_wasm(server_cache: Path) -> bytes:
    from pie.runtime.build import build_inferlet

    return build_inferlet(CHATTY).read_bytes()


class ServerProcess:
    """`pie serve` in a subprocess; its stderr is collected (the port is read from it)."""

    def __init__(self, cache: Path, *flags: str, host: str = "127.0.0.1") -> None:
        env = dict(os.environ, PIE_CACHE_DIR=str(cache), PYTHONUNBUFFERED="1")
        command = [sys.executable, "-m", "pie.cli", "serve", "--host", host, "--port", "0"]
        command += ["--kv-pages", str(KV_PAGES), "--log-level", "warning", *flags]
        self.proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        self.lines: list[str] = []
        self._port = threading.Event()
        self.port = 0
        threading.Thread(target=self._collect, daemon=True).start()
        if not self._port.wait(120) or self.port == 0:
            self.stop()
            raise RuntimeError("pie serve did not start:\n" + self.log)
        self.url = f"ws://127.0.0.1:{self.port}/ws"
        self.http = f"http://127.0.0.1:{self.port}"
        self.wait_healthy()

    def _collect(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            found = re.search(r"listening on http://\S+?:(\d+)", line)
            if found:
                self.port = int(found.group(1))
                self._port.set()
        self._port.set()  # the process ended

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.http + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("pie serve is not healthy:\n" + self.log)

    def healthy(self) -> bool:
        try:
            return httpx.get(self.http + "/health", timeout=10).json()["status"] == "ok"
        except httpx.HTTPError:
            return False

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture(scope="session")
def server(server_cache: Path, chatty_wasm: bytes) -> Iterator[ServerProcess]:
    """The shared server: bound to every address (so a non-loopback client can be refused),
    frames limited to 1 MiB (so oversized frames are cheap to make)."""
    config = server_cache / "server.toml"
    config.write_text(
        "max_frame_bytes = 1048576\nupload_chunk_bytes = 524288\n"
        '[mcp_servers.desk]\nurl = "http://127.0.0.1:9/mcp"\n'  # named, never reached
    )
    proc = ServerProcess(server_cache, "--config", str(config), host="0.0.0.0")
    yield proc
    code = proc.stop()
    assert code == 0, proc.log
    assert "pool whole" in proc.lines[-1], proc.log


def run(coroutine: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
    """Runs a client coroutine to its end (each test its own event loop)."""
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


async def upload(server: ServerProcess, wasm: bytes) -> str:
    async with PieClient.connect(server.url) as client:
        return await client.upload(wasm, name="chatty")


async def wait_pool_whole(client: PieClient, timeout: float = 30.0) -> dict[str, Any]:
    """The pool's counts once every page is back (or the last seen, after `timeout`)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        pages: dict[str, Any] = (await client.info())["pages"]
        if pages["used"] == 0 or asyncio.get_running_loop().time() > deadline:
            return pages
        await asyncio.sleep(0.05)


def non_loopback_address() -> str | None:
    """An address of this machine other than loopback, if it has one."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 9))  # no packet is sent: this only picks a route
        address = str(probe.getsockname()[0])
    except OSError:
        try:
            address = socket.gethostbyname(socket.gethostname())
        except OSError:
            return None
    finally:
        probe.close()
    return None if address.startswith("127.") or address == "0.0.0.0" else address


@pytest.fixture(scope="session")
def chatty(server: ServerProcess, chatty_wasm: bytes) -> str:
    """The test inferlet's hash, uploaded to the shared server."""
    return run(upload(server, chatty_wasm))
