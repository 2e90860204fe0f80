"""The tools agents call: a small HTTP server on loopback for the agent tests and `bench.agentic`.

    python -m bench.agentic.tool_server --port 9000 --latency-ms 100

Every tool answers JSON after `latency_s` (the tool's own work, e.g. a remote search), so a
benchmark can sweep tool latency. The tools:

- `GET /calc?expr=...`: arithmetic (+ - * / // % ** and parentheses on numbers), `{"result": x}`.
- `GET /lookup?q=...`: the best matching document of a small local set, `{"title", "text"}`.
- `GET /search?q=...`: the titles and first sentences of the three best matches.
- `POST /run_python` (body: Python source): runs it in a child interpreter (`python -I`) with a
  wall-clock timeout, CPU and memory limits and an empty working folder, `{"stdout", "stderr",
  "exit"}`: the code-execution tool of a CodeAct agent.

A server made with `fault=` misbehaves on every path, for the tests that an agent survives a
tool failing: `"hang"` never answers, `"garbage"` answers bytes that are not HTTP, `"500"`
answers an internal error.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import operator
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

DOCUMENTS = {
    "Zorbia": "Zorbia is an island nation in the Quiet Sea. Its capital is Quellen. "
    "Zorbia has a population of 412 thousand people. Its main export is blue salt.",
    "Quellen": "Quellen is the capital of Zorbia. The city has 96 thousand residents "
    "and was founded in 1732. Quellen is known for its glass bridges.",
    "Marovia": "Marovia is a mountain country east of Zorbia. Its capital is Tessel. "
    "Marovia has a population of 1250 thousand people. Its main export is copper.",
    "Tessel": "Tessel is the capital of Marovia. The city has 310 thousand residents "
    "and was founded in 1504. Tessel is known for its clock towers.",
    "Blue salt": "Blue salt is mined on the coasts of Zorbia. A ton of blue salt sells "
    "for 18 coins. Zorbia sells 40 tons a year.",
    "Copper": "Copper from Marovia sells for 7 coins a ton. Marovia sells 900 tons a year.",
    "Glass bridges": "Quellen has 12 glass bridges. The oldest was built in 1801.",
    "Clock towers": "Tessel has 27 clock towers. The tallest is 88 meters high.",
}

RUN_TIMEOUT_S = 5.0  # wall clock for one /run_python
RUN_CPU_S = 2  # CPU seconds for one /run_python
RUN_MEMORY = 512 * 2**20  # address space for one /run_python
OUTPUT_CAP = 4096  # bytes of stdout/stderr returned

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculate(expr: str) -> float | int:
    """Evaluates arithmetic on numbers only; anything else is a ValueError."""

    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](value(node.operand))
        raise ValueError(f"not arithmetic: {ast.dump(node)[:60]}")

    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an expression: {e.msg}") from None
    try:
        result = value(tree.body)
    except ZeroDivisionError:
        raise ValueError("division by zero") from None
    return int(result) if isinstance(result, float) and result.is_integer() else result


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def ranked(query: str) -> list[str]:
    """Document titles, best match first: title words count double, ties by title."""
    q = _words(query)

    def score(title: str) -> tuple[int, str]:
        return (-(2 * len(q & _words(title)) + len(q & _words(DOCUMENTS[title]))), title)

    return sorted(DOCUMENTS, key=score)


def run_python(code: str) -> dict[str, Any]:
    """Runs `code` in an isolated child interpreter under time, CPU and memory limits."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (RUN_CPU_S, RUN_CPU_S))
        resource.setrlimit(resource.RLIMIT_AS, (RUN_MEMORY, RUN_MEMORY))
        resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))

    with tempfile.TemporaryDirectory(prefix="pie-tool-") as folder:
        try:
            done = subprocess.run(
                [sys.executable, "-I", "-c", code],
                cwd=folder,
                capture_output=True,
                timeout=RUN_TIMEOUT_S,
                preexec_fn=limit,
                env={"PATH": "/usr/bin:/bin"},
            )
        except subprocess.TimeoutExpired:
            return {"stdout": "", "stderr": f"timed out after {RUN_TIMEOUT_S:g} s", "exit": -9}
    stderr = done.stderr[-OUTPUT_CAP:].decode(errors="replace")
    if done.returncode < 0:  # a limit killed it: say which signal, the code alone is cryptic
        stderr += f"killed by signal {-done.returncode} (CPU {RUN_CPU_S} s, memory limits)"
    return {
        "stdout": done.stdout[:OUTPUT_CAP].decode(errors="replace"),
        "stderr": stderr,
        "exit": done.returncode,
    }


class ToolServer(ThreadingHTTPServer):
    """The tools on 127.0.0.1 (a free port unless given); a context manager serving on a thread."""

    daemon_threads = True

    def __init__(self, latency_s: float = 0.0, fault: str | None = None, port: int = 0) -> None:
        if fault not in (None, "hang", "garbage", "500"):
            raise ValueError(f"unknown fault {fault!r}")
        super().__init__(("127.0.0.1", port), _Handler)
        self.latency_s = latency_s
        self.fault = fault
        self.calls: Counter[str] = Counter()  # requests per tool path
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def count(self, path: str) -> None:
        with self._lock:
            self.calls[path] += 1

    def __enter__(self) -> ToolServer:
        self._thread = threading.Thread(target=self.serve_forever, name="tool-server", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed.set()  # a hanging handler gives up
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: ToolServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet: benchmarks print
        pass

    def do_GET(self) -> None:
        self._serve(b"")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self._serve(self.rfile.read(min(length, 1 << 20)))

    def _serve(self, body: bytes) -> None:
        server = self.server
        url = urlsplit(self.path)
        server.count(url.path)
        if server.fault == "hang":
            server._closed.wait(600)
            return
        if server.fault == "garbage":
            self.wfile.write(b"\x00\x01 this is not a status line\r\n\r\n")
            return
        if server.fault == "500":
            self._reply(500, {"error": "internal error"})
            return
        if server.latency_s:
            time.sleep(server.latency_s)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        try:
            status, payload = 200, self._tool(url.path, query, body)
        except ValueError as e:
            status, payload = 400, {"error": str(e)}
        self._reply(status, payload)

    def _tool(self, path: str, query: dict[str, str], body: bytes) -> dict[str, Any]:
        if path == "/calc":
            return {"result": calculate(query.get("expr", ""))}
        if path == "/lookup":
            title = ranked(query.get("q", ""))[0]
            return {"title": title, "text": DOCUMENTS[title]}
        if path == "/search":
            hits = ranked(query.get("q", ""))[:3]
            return {"results": [{"title": t, "text": DOCUMENTS[t].split(". ")[0]} for t in hits]}
        if path == "/run_python":
            return run_python(body.decode(errors="replace"))
        raise ValueError(f"no tool at {path}")

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args()
    with ToolServer(args.latency_ms / 1000, port=args.port) as server:
        print(f"tools at {server.url}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
