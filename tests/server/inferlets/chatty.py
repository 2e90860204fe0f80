"""A test inferlet for the server tests: one build serves them all; args[0] picks the behaviour."""

import sys

from pie.sdk import Context, receive, receive_blob, send, send_blob


async def stream(n: str, prompt: str = "Once upon a time") -> str:
    ctx = Context()
    ctx.fill(prompt)
    return await ctx.generate(max_tokens=int(n), stop_tokens=(), stream=send)


async def echo() -> str:
    while (text := await receive()) != "bye":
        send("echo:" + text)
    return "bye"


async def blob() -> str:
    data = await receive_blob()
    send_blob(data[::-1])
    return str(len(data))


def speak() -> str:
    print("to stdout")
    print("to stderr", file=sys.stderr)
    return "spoke"


async def hold(prompt: str) -> str:
    """Holds KV pages (a filled, generated context) until a message comes."""
    ctx = Context()
    ctx.fill(prompt)
    send(await ctx.generate(max_tokens=2, stop_tokens=()))
    return "released:" + await receive()


def fail() -> str:
    raise ValueError("asked to fail")


async def main(args: list[str]) -> str:
    mode, rest = args[0], args[1:]
    if mode == "stream":
        return await stream(*rest)
    if mode == "echo":
        return await echo()
    if mode == "blob":
        return await blob()
    if mode == "speak":
        return speak()
    if mode == "hold":
        return await hold(" ".join(rest))
    if mode == "fail":
        return fail()
    raise ValueError(f"unknown mode {mode!r}")
