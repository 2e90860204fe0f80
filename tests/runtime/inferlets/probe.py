"""A test inferlet: one build serves every runtime test; args[0] picks the behaviour."""

import asyncio
import contextlib
import json
import sys

from pie.sdk import (
    Context,
    Greedy,
    Model,
    PieError,
    RawLogits,
    Sample,
    Subscription,
    launch,
    pull,
    push,
    send,
)
from pie.sdk import _wit as wit


async def generate(n: str, prompt: str) -> str:
    ctx = Context()
    ctx.fill(prompt)
    return json.dumps(await ctx.generate_tokens(int(n), stop_tokens=()))


async def generate_after(topic: str, n: str, prompt: str) -> str:
    """`generate` once a message arrives on `topic` (holds its slot until then)."""
    await pull(topic)
    return await generate(n, prompt)


async def generate_own_loop(n: str, prompt: str) -> str:
    """`generate` with the guest's own per-token loop (one host call per token)."""
    ctx = Context()
    ctx.fill(prompt)
    return json.dumps(await ctx.generate_tokens(int(n), stop_tokens=(), delegate=False))


async def stream(n: str, prompt: str, delegate: str = "1") -> str:
    ctx = Context()
    ctx.fill(prompt)
    return await ctx.generate(
        max_tokens=int(n), stop_tokens=(), stream=send, delegate=delegate == "1"
    )


async def loops(n: str, prompt: str, stops: str) -> str:
    """The same generations run by the host's loop and by the guest's own, greedy and seeded:
    text, what a stream callback saw, the queued token and KV length after, and the tokens."""
    out = {}
    samplers = {"greedy": Greedy(), "seeded": Sample(temperature=0.8, top_p=0.95, seed=7)}
    for name, sampler in samplers.items():
        for delegate in (True, False):
            ctx = Context()
            ctx.fill(prompt)
            seen: list[str] = []
            text = await ctx.generate(
                int(n), sampler, stop=json.loads(stops), stream=seen.append, delegate=delegate
            )
            after = [list(ctx.pending), ctx.kv_length]
            ctx.close()
            ctx = Context()
            ctx.fill(prompt)
            tokens = await ctx.generate_tokens(int(n), sampler, delegate=delegate)
            ctx.close()
            out[f"{name}-{'host' if delegate else 'guest'}"] = [text, "".join(seen), after, tokens]
    return json.dumps(out)


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


def _outputs(future: int) -> list:
    """The outputs of a submitted pass, once it ran (or the error its admission raised)."""
    wit.poll.wait_any([future], None)
    return wit.forward.outputs(future)


def _errors(calls: dict) -> str:
    """Runs each misuse; its error text, or None where it wrongly succeeded."""
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


def abuse() -> str:
    """Each misuse must come back as an error the inferlet can catch."""
    ctx = Context()
    model = Model.default()
    return _errors(
        {
            "foreign-context": lambda: wit.kv.length(123456),
            "model-as-context": lambda: wit.kv.length(model.handle),
            "bad-model": lambda: wit.kv.create(99999),
            "future-not-ready-or-unknown": lambda: wit.forward.outputs(4242),
            "token-out-of-vocab": lambda: wit.model.decode(model.handle, [10**9]),
            # Checked against the context's length where it is admitted: the pass's error.
            "mask-bad-runs": lambda: _outputs(ctx.submit([5, 6], [], attention_mask=[[1], [2]])),
            "logit-mask-bad": lambda: ctx.submit([5], [], logit_mask=[3]),
            "no-tokens": lambda: ctx.submit([], []),
            "huge-forward": lambda: ctx.submit([5] * 100_000, []),
            "unknown-program": lambda: wit.runtime.launch("no-such-program", []),
            "unknown-export": lambda: wit.kv.import_context(model.handle, "nope"),
            "truncate-past-end": lambda: wit.kv.truncate(ctx.handle, 10**6),
            "take-text-of-context": lambda: wit.poll.take_text(ctx.handle),
        }
    )


async def freed() -> str:
    """Handles used after they were freed, and freed twice."""
    model = Model.default()
    ctx = Context()
    taken = ctx.submit([5], [(0, Greedy())])
    await Context.result(taken)  # taking the outputs frees the future
    dropped = ctx.submit([6], [])
    wit.poll.discard(dropped)
    (logits,) = await ctx.forward([7], [(0, RawLogits())])
    logits.release()
    decoder = wit.model.decoder_new(model.handle)
    wit.model.decoder_finish(decoder)
    sub = wit.messaging.subscribe("freed")
    wit.messaging.unsubscribe(sub)
    closed = Context()
    closed_id = closed.handle
    closed.close()
    one_token = wit.forward.ForwardArgs([5], None, None, None, [])
    return _errors(
        {
            "outputs-twice": lambda: wit.forward.outputs(taken),
            "discard-twice": lambda: wit.poll.discard(dropped),
            "wait-on-freed": lambda: wit.poll.wait_any([dropped], 0),
            "logits-after-release": lambda: wit.forward.logits_top_k(logits.handle, 3),
            "release-twice": lambda: wit.forward.logits_release(logits.handle),
            "decoder-after-finish": lambda: wit.model.decoder_push(decoder, [5]),
            "finish-twice": lambda: wit.model.decoder_finish(decoder),
            "next-after-unsubscribe": lambda: wit.messaging.next(sub),
            "unsubscribe-twice": lambda: wit.messaging.unsubscribe(sub),
            "forward-on-closed": lambda: wit.forward.execute(closed_id, one_token),
            "fork-closed": lambda: wit.kv.fork(closed_id),
            "cancel-a-forward": lambda: wit.runtime.cancel(ctx.submit([8], [])),
        }
    )


def malformed() -> str:
    """Arguments past every limit, or shaped wrongly."""
    model = Model.default()
    ctx = Context()
    vocab = wit.model.info(model.handle).vocab_size
    ready = ctx.submit([5], [])
    wit.poll.wait_any([ready], None)
    big = "a" * (16 * 2**20 + 1)
    errors = json.loads(
        _errors(
            {
                "wait-any-over-limit": lambda: wit.poll.wait_any([ready] * 65537, 0),
                "encode-over-limit": lambda: wit.model.encode(model.handle, "a" * (2**20 + 1)),
                "push-over-limit": lambda: wit.messaging.push("big", big),
                "send-over-limit": lambda: wit.session.send(big),
                "position-past-model": lambda: ctx.submit([5], [], positions=[10**9]),
                "token-negative": lambda: ctx.submit([-1], []),
                "token-past-u32": lambda: ctx.submit([2**32], []),
                "position-negative": lambda: ctx.submit([5], [], positions=[-1]),
                "prompt-past-context": lambda: Context().fill_tokens([5] * 10**5),
                "output-past-tokens": lambda: ctx.submit([5], [(3, Greedy())]),
                "logit-mask-bans-all": lambda: ctx.submit([5], [(0, Greedy())], logit_mask=[vocab]),
                "reserve-the-world": lambda: wit.kv.reserve(ctx.handle, 2**32 - 1),
                "mask-backwards": lambda: wit.kv.mask(ctx.handle, 1, 0, True),
                "empty-topic": lambda: wit.messaging.push("", "x"),
            }
        )
    )
    # One ready id repeated up to the limit is fine, and cheap.
    errors["repeated-ids-ready"] = len(wit.poll.wait_any([ready] * 65536, 0))
    return json.dumps(errors)


async def export_hold(name: str) -> str:
    ctx = Context()
    ctx.fill("shared prefix text")
    ctx.export(name)
    await pull("never")  # holds the export's owner alive until cancelled
    return "unreachable"


async def foreign_export(name: str) -> str:
    """Another instance's export: not ours to withdraw or replace; ours to build on."""
    errors = json.loads(
        _errors(
            {
                "unexport-foreign": lambda: Context.unexport(name),
                "export-taken-name": lambda: Context().export(name),
            }
        )
    )
    on_top = Context.import_(name)
    on_top.fill("zz")  # writes past the shared prefix: the shared pages must not change
    return json.dumps({"errors": errors, "tokens": await on_top.generate_tokens(4, stop_tokens=())})


async def continue_export(name: str) -> str:
    ctx = Context.import_(name)
    ctx.fill("!")
    return json.dumps(await ctx.generate_tokens(4, stop_tokens=()))


def bus_flood(size: str) -> str:
    chunk = "m" * int(size)
    sent = 0
    try:
        while True:
            push("flood", chunk)
            sent += 1
    except PieError as e:
        return json.dumps([sent, str(e)])


def churn(n: str) -> str:
    """Waits started and withdrawn on ever new topics: must not grow the host."""
    for i in range(int(n)):
        wit.poll.discard(wit.messaging.pull(f"queue-{i}"))
        wit.messaging.unsubscribe(wit.messaging.subscribe(f"topic-{i}"))
        wit.poll.discard(wit.session.receive())
    return "churned"


async def leak() -> str:
    """Opens one of everything and ends without closing any of it."""
    model = Model.default()
    ctx = Context()
    ctx.fill("abcdefgh")
    await ctx.flush()
    forks = [ctx.fork() for _ in range(3)]
    await ctx.forward([5], [(0, RawLogits())])  # a logits row, never released
    wit.model.decoder_new(model.handle)
    wit.messaging.subscribe("leak")
    wit.messaging.pull("leak-queue")
    wit.session.receive()
    for fork in forks:
        fork.submit([6], [(0, Greedy())])  # forwards in flight, never taken
    return "left everything open"


async def wide_bomb(role: str) -> str:
    """Launches copies of itself until refused; copies then hold their slot."""
    made = 0
    try:
        while True:
            launch(["wide-bomb", "child"])
            made += 1
    except PieError as e:
        error = str(e)
    if role == "root":
        return json.dumps([made, error])
    await pull("never")
    return "unreachable"


def blob(n: str) -> str:
    wit.session.send_blob(bytes(int(n)))
    return "sent"


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


async def hold_contexts(n: str, each: str) -> str:
    """`n` contexts of `each` tokens, held until stopped."""
    held = []
    for _ in range(int(n)):
        ctx = Context()
        ctx.fill("x" * int(each))
        await ctx.flush()
        held.append(ctx)
    while True:
        await pull("never")


async def fetch_url(url: str, timeout: str = "") -> str:
    """One HTTP request: its status and body, or the error."""
    from pie.sdk import http

    try:
        reply = await http.fetch(url, timeout=float(timeout) if timeout else None)
    except PieError as e:
        return json.dumps({"error": str(e)})
    return json.dumps({"status": reply.status, "body": reply.text()})


async def fetch_many(url: str, n: str) -> str:
    """`n` requests started at once, then awaited together: statuses, or the first error."""
    from pie.sdk import http

    try:
        started = [http.start(url) for _ in range(int(n))]
        replies = await asyncio.gather(*(http.response(f) for f in started))
    except PieError as e:
        return json.dumps({"error": str(e)})
    return json.dumps({"statuses": [r.status for r in replies]})


def fail(size: str) -> str:
    raise RuntimeError("e" * int(size))


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


def print_flood() -> str:
    i = 0
    while True:  # ignores failed writes: only the runtime can end this
        with contextlib.suppress(OSError):
            print(f"line {i} " + "x" * 200, flush=True)
        i += 1


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
        "generate-own-loop": generate_own_loop,
        "stream": stream,
        "loops": loops,
        "loop": loop,
        "membomb": membomb,
        "trap": trap_mid_generation,
        "open": open_file,
        "socket": open_socket,
        "abuse": abuse,
        "freed": freed,
        "malformed": malformed,
        "export-hold": export_hold,
        "foreign-export": foreign_export,
        "continue-export": continue_export,
        "bus-flood": bus_flood,
        "churn": churn,
        "leak": leak,
        "wide-bomb": wide_bomb,
        "generate-after": generate_after,
        "blob": blob,
        "double-close": double_close,
        "handle-flood": handle_flood,
        "fork-bomb": fork_bomb,
        "hold-pages": hold_pages,
        "hold-contexts": hold_contexts,
        "fail": fail,
        "fetch": fetch_url,
        "fetch-many": fetch_many,
        "big-result": lambda size: "r" * int(size),
        "messaging": messaging,
        "worker": worker,
        "cancel-child": cancel_child,
        "fork": fork,
        "print": print_both,
        "print-flood": print_flood,
        "version": lambda: wit.runtime.version(),
        "echo": lambda *a: json.dumps(list(a)),
    }
    result = table[mode](*rest)
    if asyncio.iscoroutine(result):
        result = await result
    return result
