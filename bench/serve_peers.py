"""The three servers bench.serve drives, each started as a real process on loopback: `pie serve`,
`transformers serve --continuous-batching` and llama.cpp's `llama-server`.

Each peer knows its command line, how to tell it is ready, and which request fields make it
generate exactly the asked-for tokens (ignore EOS) with the same sampling as the others.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The same sampling for every server: temperature 1, no top-k/top-p/min-p truncation. Greedy
# would be simpler, but pie's OpenAI path has no ignore_eos, and sampling at temperature 1 keeps
# a 135M model from ending its answers early far more often than greedy does.
TEMPERATURE = 1.0


# HF's continuous batching sizes its KV cache from free memory unless told: on CPU that is
# most of the machine's RAM (14 GB of 24 here), and with the default 8192 batch tokens its
# attention masks grow with it. 128 blocks of 256 tokens (32k tokens, 1.5 GB in float32) hold
# the c=64 level's mean load (64 x ~415 tokens); 1024 batch tokens, near pie's 512.
HF_CB_BLOCKS = 128
HF_CB_BATCH_TOKENS = 1024
# llama-server splits -c evenly over its slots: 1280 tokens each fits the longest prompt aiperf
# draws here (mean 256 + 4 sd, plus the chat template) with 128 to generate.
LLAMA_SLOT_CTX = 1280


class PeerError(RuntimeError):
    """A server did not start, did not get ready in time, or is not installed."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if body is not None else {}
    req = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def http_text(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return str(resp.read().decode())


@dataclass
class Peer:
    """One server under test: how to start it and what its requests carry."""

    name: str  # pie | hf | llamacpp
    argv: list[str]
    port: int
    ready_path: str  # GET returns 200 once the model is loaded
    extra_inputs: dict[str, Any]  # merged into every chat request
    ignore_eos: str  # what this server offers to force the output length, for the report
    env: dict[str, str] = field(default_factory=dict)
    ready_timeout_s: float = 300.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def pie_peer(extra: Sequence[str] = ()) -> Peer:
    """`pie serve` with default settings, plus `extra` arguments (e.g. `--config FILE`)."""
    port = free_port()
    return Peer(
        name="pie",
        argv=[
            *(sys.executable, "-m", "pie.cli", "serve", "--host", "127.0.0.1"),
            *("--port", str(port), *extra),
        ],
        port=port,
        ready_path="/health",
        extra_inputs={"temperature": TEMPERATURE, "top_p": 1.0},
        ignore_eos="none: the OpenAI path has no ignore_eos/min_tokens (stops at EOS)",
    )


def hf_peer(hf_dir: Path) -> Peer:
    exe = shutil.which("transformers")
    if exe is None:
        raise PeerError("`transformers` CLI not found: pip install -e '.[bench]'")
    port = free_port()
    # HF serve takes a whole GenerationConfig as a JSON string; eos_token_id -1 disables EOS in
    # continuous batching (it is the value CB itself uses for "none"). CB builds its shared
    # sampler from the first request it sees, so the warm-up request carries the same fields.
    gen = {"do_sample": True, "temperature": TEMPERATURE, "top_p": 1.0, "top_k": 0}
    gen["eos_token_id"] = -1
    # fmt: off
    return Peer(
        name="hf",
        argv=[
            exe, "serve", "--continuous-batching", "--device", "cpu", "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "warning",
            "--cb-num-blocks", str(HF_CB_BLOCKS), "--cb-max-batch-tokens", str(HF_CB_BATCH_TOKENS),
            str(hf_dir),
        ],
        port=port,
        ready_path="/health",
        extra_inputs={"generation_config": json.dumps(gen)},
        ignore_eos="yes: generation_config eos_token_id=-1",
    )
    # fmt: on


def llamacpp_peer(binary: Path, gguf: Path, slots: int, slot_ctx: int = LLAMA_SLOT_CTX) -> Peer:
    port = free_port()
    threads = str(os.cpu_count() or 2)
    # fmt: off
    return Peer(
        name="llamacpp",
        argv=[
            str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "-np", str(slots), "-c", str(slots * slot_ctx), "-t", threads, "-tb", threads,
            "--cont-batching", "--jinja", "--no-webui", "--log-disable",
            "--cache-ram", "0",  # no host-RAM prompt cache: no two prompts here share a prefix
        ],
        port=port,
        ready_path="/health",
        extra_inputs={
            "ignore_eos": True,
            "temperature": TEMPERATURE,
            "top_p": 1.0,
            "top_k": 0,
            "min_p": 0.0,
        },
        ignore_eos="yes: ignore_eos",
    )
    # fmt: on


class RunningServer:
    """A peer's process, from start to a clean stop; its output goes to `log`."""

    def __init__(self, peer: Peer, log: Path) -> None:
        self.peer = peer
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.model_id = ""
        self.started_s = 0.0

    def __enter__(self) -> RunningServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = self.log.open("ab")
        env = {**os.environ, **self.peer.env}
        began = time.monotonic()
        # Its own session, so the stop reaches the workers it spawns (and only those).
        self.proc = subprocess.Popen(
            self.peer.argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        out.close()
        self._wait_ready()
        self.started_s = time.monotonic() - began
        models = http_json(self.peer.url + "/v1/models", timeout=30)
        self.model_id = str(models["data"][0]["id"])

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the server is not running"
        return self.proc.pid

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.peer.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PeerError(
                    f"{self.peer.name} exited with {self.proc.returncode} while starting; "
                    f"see {self.log}:\n{self.log.read_text(errors='replace')[-2000:]}"
                )
            try:
                urllib.request.urlopen(self.peer.url + self.peer.ready_path, timeout=5).close()
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(1.0)
        self.stop()
        raise PeerError(f"{self.peer.name} not ready after {self.peer.ready_timeout_s:.0f} s")

    def warm_up(self, prompt_words: int = 200, max_tokens: int = 16) -> None:
        """Two short requests with the run's own fields: first-call setup is not measured."""
        text = " ".join(["The lighthouse keeper climbed the stairs at dusk."] * (prompt_words // 9))
        body = {
            "model": self.model_id,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens,
            **self.peer.extra_inputs,
        }
        for _ in range(2):
            http_json(self.peer.url + "/v1/chat/completions", body, timeout=300)

    def metrics_text(self) -> str | None:
        try:
            return http_text(self.peer.url + "/metrics", timeout=10)
        except (urllib.error.URLError, OSError):
            return None

    def stop(self, grace_s: float = 60.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)  # the group of the process we started
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        # Workers of a server that exited first may linger in its group: end them too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
