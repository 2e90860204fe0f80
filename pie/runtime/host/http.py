"""Host side of the `http` interface: outgoing requests to the hosts an instance may reach.

Requests run on a small thread pool of the process the instance runs in (a worker, usually),
so a slow tool server holds a pool thread, never the instance or the engine; the guest gets a
future and may decode meanwhile. Each instance has an allowlist of hosts (`InstanceLimits.
http_hosts`, loopback by default), a cap on requests in flight, a timeout for the whole
exchange, and a cap on the response's size (`max_message_bytes`). Redirects are not followed:
one could lead off the allowlist.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from dataclasses import dataclass

import httpx

from pie.runtime.errors import HostError
from pie.runtime.host import futures
from pie.runtime.host.state import InstanceHost

POOL_THREADS = 16  # requests in flight per process, all instances together
_pool: cf.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes
    timeout_s: float | None  # None: the instance's limit


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


def allowed(hosts: tuple[str, ...] | list[str], host: str) -> bool:
    """Whether `host` matches one of `hosts`: an exact name, or "*.domain" for its subdomains."""
    host = host.lower().strip("[]")
    for rule in hosts:
        rule = rule.lower().strip("[]")
        if host == rule or (rule.startswith("*.") and host.endswith(rule[1:])):
            return True
    return False


def fetch(host: InstanceHost, req: HttpRequest) -> int:
    limits = host.limits
    try:
        url = httpx.URL(req.url)
    except (httpx.InvalidURL, TypeError) as e:
        raise HostError(f"not a URL: {req.url!r} ({e})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise HostError(f"only http and https URLs with a host can be fetched, not {req.url!r}")
    if not allowed(limits.http_hosts, url.host):
        raise HostError(
            f"host {url.host!r} is not allowed for this instance (it may reach "
            f"{', '.join(limits.http_hosts) or 'no host'}); the server's http_hosts grants more"
        )
    if len(req.body) > limits.max_message_bytes:
        raise HostError(
            f"request body of {len(req.body)} bytes; the limit is {limits.max_message_bytes}"
        )
    running = sum(1 for f in _in_flight(host) if not f.done())
    if running >= limits.http_in_flight:
        raise HostError(f"{running} requests in flight; at most {limits.http_in_flight} at once")
    timeout = (
        limits.http_timeout_s
        if req.timeout_s is None
        else min(req.timeout_s, limits.http_timeout_s)
    )
    future = _executor().submit(_perform, req, timeout, limits.max_message_bytes)
    return futures.add(host, "http", future)


def take_response(host: InstanceHost, handle: int) -> HttpResponse:
    response: HttpResponse = futures.take(host, handle, "http")
    return response


def _in_flight(host: InstanceHost) -> list[cf.Future[object]]:
    return [entry.future for entry in host.handles.values(futures.KIND) if entry.what == "http"]


def _executor() -> cf.ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = cf.ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="pie-http")
        return _pool


def _perform(req: HttpRequest, timeout: float, cap: int) -> HttpResponse:
    deadline = time.monotonic() + timeout
    try:
        with (
            httpx.Client(timeout=timeout, follow_redirects=False) as client,
            client.stream(req.method, req.url, headers=req.headers, content=req.body) as reply,
        ):
            body = bytearray()
            for chunk in reply.iter_bytes():
                body += chunk
                if len(body) > cap:
                    raise HostError(f"the response passed {cap} bytes; it was dropped")
                if time.monotonic() > deadline:
                    raise httpx.ReadTimeout("the response took too long")
            return HttpResponse(reply.status_code, list(reply.headers.multi_items()), bytes(body))
    except httpx.TimeoutException:
        raise HostError(f"{req.method} {req.url} timed out after {timeout:g} s") from None
    except httpx.HTTPError as e:
        raise HostError(f"{req.method} {req.url} failed: {type(e).__name__}: {e}") from None
