"""The OpenAI API while `pie serve` drains: new requests get 503 with an OpenAI-shaped body, a
running stream ends with an error event once the grace period is over, and the process exits
0 with every KV page back."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import ServerProcess

pytestmark = pytest.mark.slow  # its own pie serve
MODEL = "smollm2-135m-instruct"
LONG = {"model": MODEL, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 4000, "temperature": 0}
PROBE = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}


def test_draining_server_refuses_with_503_and_ends_running_streams(server_cache: Path) -> None:
    proc = ServerProcess(server_cache, "--drain-grace", "1")
    events: list[dict[str, object]] = []
    started = threading.Event()

    def stream() -> None:
        body = {**LONG, "stream": True}  # greedy counting: goes on past the grace period
        with httpx.stream("POST", proc.http + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[6:]))
                    started.set()

    reader = threading.Thread(target=stream)
    try:
        reader.start()
        assert started.wait(60), proc.log
        proc.proc.send_signal(signal.SIGTERM)
        refused = None
        deadline = time.monotonic() + 10
        while refused is None and time.monotonic() < deadline:
            reply = httpx.post(proc.http + "/v1/completions", json=PROBE, timeout=30)
            if reply.status_code == 503:
                refused = reply.json()
            time.sleep(0.05)
        reader.join(60)
    finally:
        code = proc.stop(timeout=60)
    assert refused is not None, proc.log
    assert refused["error"]["code"] == "server_draining"
    assert refused["error"]["type"] == "server_error" and refused["error"]["message"]
    assert not reader.is_alive()
    assert len(events) > 2 and "error" in events[-1]  # cut short, and told so
    assert events[-1]["error"]["code"] == "inferlet_failed"  # type: ignore[index]
    assert code == 0, proc.log
    assert "pool whole" in proc.lines[-1], proc.log
