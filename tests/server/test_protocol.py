"""The client protocol end to end against a real `pie serve`: upload, launch, events,
messages, blobs, attach/detach, terminate, list, info, and the errors of misused frames."""

from __future__ import annotations

import asyncio
import hashlib

import msgspec
import pytest
from websockets.asyncio.client import connect

from pie.client import InstanceError, PieClient, PieClientSync, ServerError
from pie.server import frames as f
from tests.runtime.conftest import pie_run_chat_on_stdin
from tests.server.conftest import ServerProcess, run, wait_pool_whole

pytestmark = pytest.mark.slow


def test_launch_streams_messages_then_the_result(server: ServerProcess, chatty: str) -> None:
    async def go() -> tuple[list[f.EventFrame], str]:
        async with PieClient.connect(server.url) as client:
            instance = await client.launch(chatty, ["stream", "6"])
            events = [e async for e in instance.events()]
            return events, await instance.wait()

    events, result = run(go())
    messages = [e.text for e in events if e.kind == "message"]
    assert len(messages) == 6  # one streamed piece per token, no stop tokens
    assert events[-1].kind == "return"
    assert result == "".join(m or "" for m in messages) and result.strip()
    assert all(e.kind in ("message", "return") for e in events)


def test_a_launch_claims_kv_pages_and_a_priority(server: ServerProcess, chatty: str) -> None:
    async def go() -> tuple[str, str, str]:
        async with PieClient.connect(server.url) as client:
            ran = await client.launch(chatty, ["stream", "3"], kv_reserve=8, priority=5)
            result = await ran.wait()
            with pytest.raises(ServerError) as too_big:
                await client.launch(chatty, ["stream", "3"], kv_reserve=10**7)
            with pytest.raises(ServerError) as out_of_range:
                await client.launch(chatty, ["stream", "3"], priority=1000)
            with pytest.raises(ServerError) as wider:
                await client.launch(chatty, ["stream", "3"], http_hosts=["example.com"])
            narrower = await client.launch(chatty, ["stream", "3"], http_hosts=["localhost"])
            await narrower.wait()
            with pytest.raises(ServerError) as unnamed:
                await client.launch(chatty, ["stream", "3"], mcp_servers=["desk", "files"])
            named = await client.launch(chatty, ["stream", "3"], mcp_servers=["desk"])
            await named.wait()
            wider_text = str(wider.value) + str(unnamed.value)
            return result, str(too_big.value), str(out_of_range.value) + wider_text

    result, too_big, out_of_range = run(go())
    assert result.strip()
    assert "http_hosts ['example.com'] are not among those this server allows" in out_of_range
    assert "cannot set aside 10000000 pages" in too_big or "more than the instance" in too_big
    assert "priority" in out_of_range
    assert "mcp_servers ['files'] are not among those this server's config names" in out_of_range


def test_a_known_hash_is_not_sent_again(server: ServerProcess, chatty_wasm: bytes) -> None:
    digest = hashlib.sha256(chatty_wasm).hexdigest()

    async def go() -> tuple[f.UploadReady, str, list[int]]:
        async with PieClient.connect(server.url) as client:
            await client.upload(chatty_wasm)  # known by now, or uploaded here
            ready = await client.request(f.Upload(hash=digest, size=len(chatty_wasm)))
            sent: list[int] = []
            send = client.ws.send

            async def counting_send(data: bytes) -> None:
                sent.append(len(data))
                await send(data)

            client.ws.send = counting_send  # type: ignore[method-assign,assignment]
            again = await client.upload(chatty_wasm)
            return ready, again, sent

    ready, again, sent = run(go())
    assert ready.have is True
    assert again == digest
    assert len(sent) == 1 and sent[0] < 200  # the upload frame alone, not 19 MB of chunks


def test_upload_checks_order_size_and_hash(server: ServerProcess) -> None:
    data = b"\0asm not really a component" * 100
    digest = hashlib.sha256(data).hexdigest()
    wrong = hashlib.sha256(b"other").hexdigest()

    async def go() -> list[str]:
        codes = []
        async with PieClient.connect(server.url) as client:
            attempts: list[f.Frame] = [
                f.Chunk(hash=digest, offset=0, data=data),  # before its upload frame
                f.Upload(hash=digest, size=10**12),  # over max_upload_bytes
                f.Upload(hash=digest, size=len(data)),  # accepted
                f.Chunk(hash=digest, offset=5, data=data[5:10]),  # a gap
                f.Upload(hash=wrong, size=10),  # another while one is open
                f.Chunk(hash=digest, offset=0, data=data + b"x"),  # past the declared size
                f.Upload(hash=wrong, size=len(data)),  # claims a hash the bytes do not have
                f.Chunk(hash=wrong, offset=0, data=data),
                f.Upload(hash=digest, size=len(data)),  # right hash, not a component
                f.Chunk(hash=digest, offset=0, data=data),
            ]
            for frame in attempts:
                try:
                    reply = await client.request(frame)
                    codes.append(type(reply).__name__)
                except ServerError as e:
                    codes.append(e.code)
            await client.ping()  # still connected
        return codes

    assert run(go()) == [
        "out_of_order",
        "too_large",
        "UploadReady",
        "out_of_order",
        "out_of_order",
        "too_large",
        "UploadReady",
        "hash_mismatch",
        "UploadReady",
        "bad_component",
    ]


def test_messages_blobs_and_output_reach_both_ways(server: ServerProcess, chatty: str) -> None:
    async def go() -> tuple[list[str], str, list[f.EventFrame], list[f.EventFrame]]:
        async with PieClient.connect(server.url) as client:
            echo = await client.launch(chatty, ["echo"])
            for text in ("one", "two", "bye"):
                await echo.send(text)
            echoed = [e.text or "" async for e in echo.events() if e.kind == "message"]
            blob = await client.launch(chatty, ["blob"])
            await blob.send_blob(b"\x00\x01binary\xff")
            blob_events = [e async for e in blob.events()]
            speak = await client.launch(chatty, ["speak"])
            speak_events = [e async for e in speak.events()]
            return echoed, await echo.wait(), blob_events, speak_events

    echoed, result, blob_events, speak_events = run(go())
    assert echoed == ["echo:one", "echo:two"] and result == "bye"
    assert [(e.kind, e.data, e.text) for e in blob_events] == [
        ("blob", b"\xffyranib\x01\x00", None),
        ("return", None, "9"),
    ]
    assert [(e.kind, e.text) for e in speak_events] == [
        ("stdout", "to stdout"),
        ("stderr", "to stderr"),
        ("return", "spoke"),
    ]


def test_a_failing_instance_ends_with_an_error_event(server: ServerProcess, chatty: str) -> None:
    async def go() -> InstanceError:
        async with PieClient.connect(server.url) as client:
            instance = await client.launch(chatty, ["fail"])
            with pytest.raises(InstanceError) as caught:
                await instance.wait()
            return caught.value

    error = run(go())
    assert error.reason == "failed"
    assert "asked to fail" in str(error)


def test_detached_instance_survives_and_is_attached_elsewhere(
    server: ServerProcess, chatty: str
) -> None:
    async def go() -> tuple[list[str], str, dict[str, object], dict[str, object]]:
        async with PieClient.connect(server.url) as first:
            instance = await first.launch(chatty, ["echo"])
            await instance.send("before")
            await instance.detach()
            instance_id = instance.id
            # The echo of "before" came here if it beat the detach, else it waits in the
            # backlog: either way it arrives exactly once.
            texts = [e.text or "" async for e in instance.events() if e.kind == "message"]
        await asyncio.sleep(0.3)  # the first connection is gone; a non-detached one would end
        async with PieClient.connect(server.url) as second:
            listed = {i["instance"]: i for i in await second.list()}[instance_id]
            again = await second.attach(instance_id)
            with pytest.raises(ServerError, match="attached_elsewhere"):
                async with PieClient.connect(server.url) as third:
                    await third.attach(instance_id)
            await again.send("after")
            await again.send("bye")
            texts += [e.text or "" async for e in again.events() if e.kind == "message"]
            pages = await wait_pool_whole(second)
            return texts, await again.wait(), listed, pages

    texts, result, listed, pages = run(go())
    assert texts == ["echo:before", "echo:after"] and result == "bye"
    assert listed["detached"] is True and listed["running"] is True
    assert listed["attached"] is False
    assert pages["used"] == 0


def test_terminate_ends_the_instance_as_cancelled(server: ServerProcess, chatty: str) -> None:
    async def go() -> tuple[InstanceError, dict[str, object]]:
        async with PieClient.connect(server.url) as client:
            instance = await client.launch(chatty, ["hold", "a prompt that fills a page"])
            first = await anext(instance.events())
            assert first.kind == "message"  # it holds its pages now
            await instance.terminate()
            with pytest.raises(InstanceError) as caught:
                await instance.wait()
            return caught.value, await wait_pool_whole(client)

    error, pages = run(go())
    assert error.reason == "cancelled" and "terminated by the client" in str(error)
    assert pages["used"] == 0


def test_info_reports_model_pool_and_scheduler(server: ServerProcess) -> None:
    async def go() -> dict[str, object]:
        async with PieClient.connect(server.url) as client:
            return await client.info()

    info = run(go())
    assert info["model"] == "smollm2-135m-instruct"
    assert info["vocab_size"] == 49152
    pages = info["pages"]
    assert isinstance(pages, dict) and pages["used"] == 0 and pages["total"] == 320
    assert pages["free"] + pages["reusable"] == 320  # the rest the prefix cache keeps
    assert pages["cached"] >= pages["reusable"]
    assert set(info["scheduler"]) >= {"steps", "tokens", "mean_sequences_per_step"}


def test_misused_frames_get_error_frames_naming_the_problem(
    server: ServerProcess, chatty: str
) -> None:
    async def go() -> list[tuple[int | None, str, str]]:
        replies = []
        async with connect(server.url, compression=None) as ws:
            frames: list[bytes | str] = [
                f.encode(f.Ping(id=1)),  # before hello
                f.encode(f.Hello(id=2)),
                f.encode(f.Hello(id=3)),  # twice
                "a text frame",
                f.encode(f.Launch(id=4, program="no-such-program")),
                f.encode(f.Send(id=5, instance=999999, text="hi")),
                msgspec.msgpack.encode({"v": 1, "id": 6, "type": "launch", "program": 5}),
                msgspec.msgpack.encode({"v": 9, "id": 7, "type": "ping"}),
                msgspec.msgpack.encode({"v": 1, "id": 8, "type": "fly"}),
            ]
            for frame in frames:
                await ws.send(frame)
                reply = msgspec.msgpack.decode(await ws.recv())
                replies.append((reply["id"], reply["type"], reply.get("code", "")))
        return replies

    assert run(go()) == [
        (1, "error", "out_of_order"),
        (2, "welcome", ""),
        (3, "error", "out_of_order"),
        (None, "error", "bad_frame"),
        (4, "error", "unknown_program"),
        (5, "error", "unknown_instance"),
        (6, "error", "bad_frame"),
        (7, "error", "unsupported_version"),
        (8, "error", "unknown_type"),
    ]


def test_sync_client(server: ServerProcess, chatty: str) -> None:
    with PieClientSync(server.url) as client:
        instance = client.launch(chatty, ["echo"])
        instance.send("sync")
        instance.send("bye")
        kinds = [(e.kind, e.text) for e in instance.events()]
        assert kinds == [("message", "echo:sync"), ("return", "bye")]
        assert instance.wait() == "bye"
        assert client.info()["pages"]["used"] == 0


def test_close_input_ends_the_programs_receives(server: ServerProcess, chatty: str) -> None:
    """After `close_input`, the program gets what was sent before, then `receive` raises
    `EndOfInput` (chatty's echo does not catch it, so it fails naming it); a send after it
    is refused with `input_closed`."""

    async def go() -> tuple[list[str], InstanceError, ServerError]:
        async with PieClient.connect(server.url) as client:
            echo = await client.launch(chatty, ["echo"])
            await echo.send("one")
            await echo.close_input()
            # From here the program may end at any moment (its receive raises): a second
            # close is harmless while it lives, and `unknown_instance` once it has ended.
            try:
                await echo.close_input()
            except ServerError as gone:
                assert gone.code == "unknown_instance"
            with pytest.raises(ServerError) as refused:
                await echo.send("late")
            echoed = [e.text or "" async for e in echo.events() if e.kind == "message"]
            with pytest.raises(InstanceError) as failed:
                await echo.wait()
            return echoed, failed.value, refused.value

    echoed, failed, refused = run(go())
    assert echoed == ["echo:one"]
    assert "EndOfInput: end-of-input: the client closed its input" in str(failed)
    # Refused either way: while the program lives, as `input_closed`; once its receive has
    # raised and it has ended (a loaded machine gets there first), as `unknown_instance`.
    assert refused.code in ("input_closed", "unknown_instance")


def test_pie_run_server_ends_the_chat_at_the_end_of_stdin(server: ServerProcess) -> None:
    """`printf 'q1\\nq2\\n' | pie run --server URL inferlets/chat.py` ends by itself, exit 0."""
    done = pie_run_chat_on_stdin("--server", server.http)
    assert done.returncode == 0, done.stderr
    assert "[the client closed its input; turns: 2]" in done.stdout
