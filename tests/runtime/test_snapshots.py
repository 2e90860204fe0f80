"""Named KV snapshots through the runtime: `Context.save` / `Context.open` from an inferlet,
sandboxed and natively (in-process and in a worker process), per user, and across a restart
on a snapshot directory.

On the fake engine (its next token hashes every visible slot, so a lost or wrong page changes
the answer, and an unwritten one fails the step) with `inferlets/snapshot_chat.py`; on the real
SmolLM2 the next-token logits after a restart from the directory equal those before the save.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pie.control.snapshots import SNAPSHOT_OWNER, SnapshotSettings
from pie.runtime.calls import ForwardCall
from pie.runtime.errors import InstanceFailed
from pie.runtime.limits import InstanceLimits
from pie.runtime.runtime import Runtime
from pie.runtime.session import QueueSession
from tests.runtime.conftest import ROOT, assert_pool_whole
from tests.runtime.fakes import FakeEngine

pytestmark = pytest.mark.slow  # builds a component

SNAPSHOT_CHAT = ROOT / "inferlets" / "snapshot_chat.py"
SYSTEM = "Be brief. " * 8  # 80 prompt bytes: 20+ pages of the fake's 4 slots
ARGS = ["--system", SYSTEM, "--max-tokens", "12", "Why?"]


class DiskFake(FakeEngine):
    """The fake engine with the engine's snapshot-file hooks (its saved KV is JSON)."""

    def kv_fingerprint(self) -> dict[str, Any]:
        return {"model": self.model_name, "config": "fake", "dtype": "int", "page_size": 4}

    def write_saved_pages(self, data: list[dict[int, int]], path: Path) -> None:
        path.write_text(json.dumps([{str(s): t for s, t in page.items()} for page in data]))

    def read_saved_pages(self, path: Path) -> list[dict[int, int]]:
        return [{int(s): t for s, t in page.items()} for page in json.loads(path.read_text())]


@pytest.fixture(scope="module")
def built(pie_cache: Path) -> Path:
    """The component, built once (the runtimes below load it from the cache)."""
    from pie.runtime.build import build_inferlet

    return build_inferlet(SNAPSHOT_CHAT)


def runtime_on(engine: Any, built: Path, cache: Path, workers: int, **settings: Any) -> Runtime:
    rt = Runtime(engine, cache=cache, workers=workers, snapshots=SnapshotSettings(**settings))
    rt.add_component(built, name="chat")
    rt.add_source(SNAPSHOT_CHAT, name="chat-native", native=True)
    return rt


def prompt_tokens(engine: FakeEngine) -> int:
    return sum(len(s.tokens) for b in engine.batches for s in b.sequences)


@pytest.mark.parametrize("workers", [0, 1])
def test_save_then_open_skips_the_prefill_and_survives_a_restart(
    built: Path, pie_cache: Path, tmp_path: Path, workers: int
) -> None:
    fake = DiskFake(num_pages=128)
    with runtime_on(fake, built, pie_cache, workers, directory=str(tmp_path)) as rt:
        first = json.loads(rt.run("chat", ARGS))
        ran_first = prompt_tokens(fake)
        fake.batches.clear()
        native = json.loads(rt.run("chat-native", ARGS, native=True))
        ran_native = prompt_tokens(fake)
        fake.batches.clear()
        again = json.loads(rt.run("chat", ARGS))
        assert [first["opened"], native["opened"], again["opened"]] == [False, True, True]
        assert first["answer"] == native["answer"] == again["answer"]
        assert first["snapshot_tokens"] == native["snapshot_tokens"] > 80
        assert native["prefilled"] == first["prefilled"] - first["snapshot_tokens"]
        # the engine ran the system prompt once: the opened runs ran the question and answer
        assert ran_native == prompt_tokens(fake) == ran_first - first["snapshot_tokens"]
        assert first["snapshots"] == ["snapshot-chat"]
        assert rt.pool.owned(SNAPSHOT_OWNER)  # kept by the store after every instance ended
    assert_pool_whole(rt)

    restarted = DiskFake(num_pages=128)  # a new process: an empty KV cache
    with runtime_on(restarted, built, pie_cache, workers, directory=str(tmp_path)) as rt:
        for name, native_mode in (("chat", False), ("chat-native", True)):
            out = json.loads(rt.run(name, ARGS, native=native_mode))
            assert out["opened"] and out["answer"] == first["answer"]
        assert prompt_tokens(restarted) == 2 * ran_native  # the prefix came from the disk
        out = json.loads(rt.run("chat", ["--delete", *ARGS]))
        assert out["opened"] and out["answer"] == first["answer"]
        assert rt.snapshots.names("local") == [] and list(tmp_path.iterdir()) == []
    assert_pool_whole(rt)


def test_users_see_only_their_own_snapshots(built: Path, pie_cache: Path, tmp_path: Path) -> None:
    fake = DiskFake(num_pages=256)  # bob keeps two snapshots: within a quarter of the pool
    ann, bob = InstanceLimits(user="ann"), InstanceLimits(user="bob")
    with runtime_on(fake, built, pie_cache, 0, directory=str(tmp_path)) as rt:
        assert not json.loads(rt.run("chat", ARGS, limits=ann))["opened"]
        out = json.loads(rt.run("chat", ARGS, limits=bob))
        assert not out["opened"]  # bob cannot open ann's snapshot: he made his own
        assert json.loads(rt.run("chat", ["--name", "mine", *ARGS], limits=bob))["snapshots"] == [
            "mine",
            "snapshot-chat",
        ]
        assert rt.snapshots.names("ann") == ["snapshot-chat"]
        rt.snapshots.delete("bob", "snapshot-chat")
        assert json.loads(rt.run("chat", ARGS, limits=ann))["opened"]  # ann's is still hers


def test_a_save_past_the_quota_fails_with_the_quota_named(built: Path, pie_cache: Path) -> None:
    rt = runtime_on(DiskFake(num_pages=128), built, pie_cache, 0, quota_pages=4)
    with rt, pytest.raises(InstanceFailed, match="the snapshot quota is 4 pages"):
        rt.run("chat", ARGS)
    assert_pool_whole(rt)


# ---- the real model -----------------------------------------------------------------------------
def test_logits_after_a_restart_equal_those_before(pie_cache: Path, tmp_path: Path) -> None:
    import torch

    from pie.engine.engine import Engine
    from pie.engine.request import Greedy, RawLogits

    engine = Engine.load(None, dtype=torch.float32, num_pages=64)
    prompt = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 3)
    probe = engine.tokenizer.encode(" Then")

    def forward(rt: Runtime, ctx: int, tokens: list[int], sampler: Any) -> Any:
        call = ForwardCall(list(tokens), None, None, None, [(len(tokens) - 1, sampler)])
        return rt.plane.submit(1, [(ctx, call)])[0].result(timeout=60)[0]

    def continuation(rt: Runtime, ctx: int) -> tuple[torch.Tensor, list[int]]:
        logits = forward(rt, ctx, probe, RawLogits()).logits
        tokens = [int(torch.argmax(logits))]
        for _ in range(11):
            tokens.append(forward(rt, ctx, tokens[-1:], Greedy()).token_id)
        return logits.clone(), tokens

    def register(rt: Runtime) -> None:
        rt.plane.register(1, QueueSession(), InstanceLimits())

    settings = SnapshotSettings(directory=str(tmp_path))
    with Runtime(engine, cache=pie_cache, workers=0, snapshots=settings) as rt:
        register(rt)
        rt.plane.kv_create(1, 10)
        forward(rt, 10, prompt, Greedy())
        rt.plane.kv_save(1, 10, "fox", None)
        rt.plane.kv_fork(1, 10, 11)
        before = continuation(rt, 11)
        rt.plane.release(1)
    engine.kv_cache.zero_()  # a restart: nothing of the saved KV is left in the pool
    with Runtime(engine, cache=pie_cache, workers=0, snapshots=settings) as rt:
        register(rt)
        rt.plane.kv_open(1, 20, "fox")
        assert rt.plane.kv_length(1, 20) == len(prompt)
        after = continuation(rt, 20)
        rt.plane.release(1)
    assert torch.equal(before[0], after[0])
    assert before[1] == after[1]
