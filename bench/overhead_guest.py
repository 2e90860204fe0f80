"""The inferlet of `python -m bench.overhead`: one mode per measurement (args[0])."""

import asyncio
import json
import time

from pie.sdk import Context, pull
from pie.sdk import _wit as wit


async def generate(prompt, n, delegate="1"):
    """Greedy tokens from a prompt of token ids; the host runs the loop unless delegate is 0."""
    ctx = Context()
    ctx.fill_tokens(json.loads(prompt))
    tokens = await ctx.generate_tokens(int(n), stop_tokens=(), delegate=delegate == "1")
    return json.dumps(tokens)


def host_calls(n):
    count = int(n)
    start = time.perf_counter()
    for _ in range(count):
        pass
    empty = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(count):
        wit.runtime.instance_id()
    return json.dumps((time.perf_counter() - start - empty) / count)


def to_host(n, repeats):
    data = bytes(int(n))
    start = time.perf_counter()
    for _ in range(int(repeats)):
        wit.session.send_blob(data)
    return json.dumps((time.perf_counter() - start) / int(repeats))


def round_trip(k, repeats):
    future = Context().submit([1])
    wit.poll.wait_any([future], None)
    handles = [future] * int(k)
    start = time.perf_counter()
    for _ in range(int(repeats)):
        wit.poll.wait_any(handles, 0)  # k ids in, k positions out
    return json.dumps((time.perf_counter() - start) / int(repeats))


async def main(args):
    modes = {
        "generate": generate,
        "host-calls": host_calls,
        "to-host": to_host,
        "round-trip": round_trip,
        "hello": lambda: wit.session.send(""),
        "idle": lambda: pull("never"),
    }
    result = modes[args[0]](*args[1:])
    if asyncio.iscoroutine(result) or asyncio.isfuture(result):
        result = await result
    return str(result)
