"""A test inferlet: one build serves every runtime test; args[0] picks the behaviour."""

import asyncio
import json
import sys

from pie.sdk import Context, Model, PieError, Subscription, launch, pull, push, send
from pie.sdk import _wit as wit


async def generate(n: str, prompt: str) -> str:
    ctx = Context()
    ctx.fill(prompt)
    return json.dumps(await ctx.generate_tokens(int(n), stop_tokens=()))


async def stream(n: str, prompt: str) -> str:
    ctx = Context()
    ctx.fill(prompt)
    return await ctx.generate(max_tokens=int(n), stop_tokens=(), stream=send)


def loop() -> str:
    x = 0
    while True:
        x += 1


def membomb() -> str:
    hoard = []
    while True:
        hoard.append(bytearray(1 << 20))


async def trap_mid_generation() -> str:
    ctx = Context()
    ctx.fill("abc")
    await ctx.generate_tokens(5, stop_tokens=())

    def deep(n: int) -> int:
        return deep(n + 1) + 1

    sys.setrecursionlimit(10**8)
    return str(deep(0))  # overflows the wasm stack: a trap, not a Python exception


def open_file() -> str:
    with open("/etc/passwd") as f:
        return f.read()


def open_socket() -> str:
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.connect(("127.0.0.1", 80))
    sock.close()
    return "connected"


def abuse() -> str:
    """Each misuse must come back as an error the inferlet can catch."""
    ctx = Context()
    model = Model.default()
    calls = {
        "foreign-context": lambda: wit.kv.length(123456),
        "model-as-context": lambda: wit.kv.length(model.handle),
        "bad-model": lambda: wit.kv.create(99999),
        "future-not-ready-or-unknown": lambda: wit.forward.outputs(4242),
        "token-out-of-vocab": lambda: wit.model.decode(model.handle, [10**9]),
        "mask-bad-runs": lambda: ctx.submit([5, 6], [], attention_mask=[[1], [2]]),
        "logit-mask-bad": lambda: ctx.submit([5], [], logit_mask=[3]),
        "no-tokens": lambda: ctx.submit([], []),
        "huge-forward": lambda: ctx.submit([5] * 100_000, []),
        "unknown-program": lambda: wit.runtime.launch("no-such-program", []),
        "unknown-export": lambda: wit.kv.import_context(model.handle, "nope"),
        "truncate-past-end": lambda: wit.kv.truncate(ctx.handle, 10**6),
        "take-text-of-context": lambda: wit.poll.take_text(ctx.handle),
    }
    errors = {}
    for name, fn in calls.items():
        try:
            fn()
            errors[name] = None
        except wit.Err as e:
            errors[name] = str(e.value)
        except PieError as e:
            errors[name] = str(e)
    return json.dumps(errors)


def double_close() -> str:
    ctx = Context()
    handle = ctx.handle
    wit.kv.close(handle)
    try:
        wit.kv.close(handle)
    except wit.Err as e:
        return str(e.value)
    return "no error"


def handle_flood() -> str:
    made = 0
    try:
        while True:
            Context()
            made += 1
    except PieError as e:
        return json.dumps([made, str(e)])


async def fork_bomb(depth: str) -> str:
    try:
        child = launch(["fork-bomb", str(int(depth) + 1)])
    except PieError as e:
        return json.dumps({"depth": int(depth), "error": str(e)})
    return await child.result()


async def hold_pages(n: str) -> str:
    ctx = Context()
    ctx.fill("x" * int(n))
    await ctx.flush()
    while True:  # holds its pages until stopped
        await pull("never")


async def messaging(n: str) -> str:
    count = int(n)
    children = [launch(["worker", str(i)]) for i in range(count)]
    ready = sorted([await pull("ready") for _ in range(count)])
    wit.messaging.broadcast("go", "start")
    results = await asyncio.gather(*(c.result() for c in children))
    return json.dumps({"ready": ready, "results": sorted(results)})


async def worker(i: str) -> str:
    sub = Subscription("go")
    push("ready", f"worker {i}")
    message = await sub.next()
    sub.close()
    return f"{i}:{message}"


async def cancel_child() -> str:
    child = launch(["hold-pages", "8"])
    await asyncio.sleep(0.2)
    child.cancel()
    try:
        await child.result()
    except PieError as e:
        return str(e)
    return "child finished"


def print_both() -> str:
    print("hello on stdout")
    print("hello on stderr", file=sys.stderr)
    return "printed"


async def fork(n: str, k: str) -> str:
    prompt = Context()
    prompt.fill("shared prefix " * 3)
    forks = [prompt.fork() for _ in range(int(k))]
    for i, f in enumerate(forks):
        f.fill(str(i))
    outs = await asyncio.gather(*(f.generate_tokens(int(n), stop_tokens=()) for f in forks))
    return json.dumps(outs)


async def main(args: list[str]) -> str:
    mode, rest = args[0], args[1:]
    table = {
        "generate": generate,
        "stream": stream,
        "loop": loop,
        "membomb": membomb,
        "trap": trap_mid_generation,
        "open": open_file,
        "socket": open_socket,
        "abuse": abuse,
        "double-close": double_close,
        "handle-flood": handle_flood,
        "fork-bomb": fork_bomb,
        "hold-pages": hold_pages,
        "messaging": messaging,
        "worker": worker,
        "cancel-child": cancel_child,
        "fork": fork,
        "print": print_both,
        "version": lambda: wit.runtime.version(),
        "echo": lambda *a: json.dumps(list(a)),
    }
    result = table[mode](*rest)
    if asyncio.iscoroutine(result):
        result = await result
    return result
