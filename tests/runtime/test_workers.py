"""Instances in worker processes: spread over the workers, equal to the reference, talking to
each other across them, and a killed worker ending only its own instances."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from pie.runtime.errors import InstanceFailed
from pie.runtime.records import InstanceRecord
from pie.runtime.runtime import Runtime
from pie.runtime.session import QueueSession
from tests.runtime.conftest import assert_pool_whole, make_runtime
from tests.runtime.fakes import OFFSET, FakeEngine, reference_generation

pytestmark = pytest.mark.slow


def _tokens(text: str) -> list[int]:
    return [b + OFFSET for b in text.encode()]


def _placed(rt: Runtime) -> list[InstanceRecord]:
    """Every record the worker pool launches, in order (a spy on the pool)."""
    assert rt.workers is not None
    launched: list[InstanceRecord] = []
    launch = rt.workers.launch

    def spy(record: InstanceRecord) -> None:
        launch(record)
        launched.append(record)

    rt.workers.launch = spy  # type: ignore[method-assign]
    return launched


@pytest.fixture
def workers_runtime(pie_cache: Path, probe_wasm: Path) -> Runtime:
    engine = FakeEngine(num_pages=512, page_size=16, step_delay=0.002)
    rt = make_runtime(engine, pie_cache, workers=2)
    rt.add_component(probe_wasm, name="probe")
    yield rt  # type: ignore[misc]
    rt.close()
    assert_pool_whole(rt)


def test_instances_spread_over_the_workers_and_equal_the_reference(
    workers_runtime: Runtime,
) -> None:
    rt = workers_runtime
    placed = _placed(rt)
    modes = ["generate", "generate-own-loop"]
    prompts = [f"prompt {i}" for i in range(8)]
    instances = [rt.launch("probe", [modes[i % 2], "20", p]) for i, p in enumerate(prompts)]
    outputs = [json.loads(x.wait(30)) for x in instances]
    assert outputs == [reference_generation(_tokens(p), 20) for p in prompts]
    assert {r.worker for r in placed} == {0, 1}
    assert rt.scheduler.stats.mean_sequences_per_step > 1  # both workers' passes shared steps


def test_messaging_and_children_across_workers(workers_runtime: Runtime) -> None:
    rt = workers_runtime
    placed = _placed(rt)
    out = json.loads(rt.run("probe", ["messaging", "4"]))
    assert out["ready"] == [f"worker {i}" for i in range(4)]
    assert out["results"] == [f"{i}:start" for i in range(4)]
    assert {r.worker for r in placed} == {0, 1}  # parent and children on both workers


def test_an_export_is_imported_by_an_instance_on_another_worker(workers_runtime: Runtime) -> None:
    rt = workers_runtime
    placed = _placed(rt)
    holder = rt.launch("probe", ["export-hold", "shared-prefix"])
    deadline = time.monotonic() + 10
    while "shared-prefix" not in rt.exports.list() and time.monotonic() < deadline:
        time.sleep(0.01)
    # The least-loaded worker is the other one while the holder runs.
    reader = rt.launch("probe", ["continue-export", "shared-prefix"])
    tokens = json.loads(reader.wait(30))
    assert placed[0].worker != placed[1].worker
    assert tokens == reference_generation(_tokens("shared prefix text!"), 4)
    holder.cancel("done")
    with pytest.raises(InstanceFailed):
        holder.wait(10)


def test_a_killed_worker_ends_only_its_own_instances(workers_runtime: Runtime) -> None:
    """SIGKILL one worker mid-generation: its instances fail naming the cause, the others
    finish with the right tokens, every page comes back, and a fresh worker takes over."""
    rt = workers_runtime
    assert rt.workers is not None
    placed = _placed(rt)
    sessions = [QueueSession() for _ in range(8)]
    modes = ["generate", "generate-own-loop"]
    instances = [
        rt.launch("probe", [modes[i % 2], "400", f"p{i}"], session=sessions[i]) for i in range(8)
    ]
    time.sleep(0.3)  # all are generating (400 steps of 2 ms)
    assert all(x.running for x in instances)
    victim = rt.workers.workers[0]
    pid = victim.process.pid
    os.kill(pid, signal.SIGKILL)
    for record in placed:
        if record.worker == 0:
            with pytest.raises(InstanceFailed) as failed:
                record.wait(10)
            assert f"worker process 0 (pid {pid}) died: killed by signal SIGKILL" in str(
                failed.value
            )
        else:
            tokens = json.loads(record.wait(30))
            assert tokens == reference_generation(_tokens(f"p{record.id - 1}"), 400)
    assert {r.worker for r in placed} == {0, 1}
    deadline = time.monotonic() + 10
    while rt.pool.free_count != rt.pool.num_pages and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rt.pool.free_count == rt.pool.num_pages
    # The replacement serves new launches.
    assert rt.workers.workers[0].process.pid != pid
    assert json.loads(rt.run("probe", ["generate", "5", "again"])) == reference_generation(
        _tokens("again"), 5
    )


def test_the_host_loop_equals_the_guest_loop(workers_runtime: Runtime) -> None:
    out = json.loads(workers_runtime.run("probe", ["loops", "40", "Once upon", '["ab", "q"]']))
    for sampler in ("greedy", "seeded"):
        host, guest = out[f"{sampler}-host"], out[f"{sampler}-guest"]
        assert host == guest
        text, streamed, (pending, _), tokens = host
        assert streamed == text and len(pending) == 1 and len(tokens) == 40


def test_a_stream_to_the_client_is_the_same_from_either_loop(workers_runtime: Runtime) -> None:
    texts = []
    for delegate in ("1", "0"):
        session = QueueSession()
        record = workers_runtime.launch("probe", ["stream", "30", "Hi", delegate], session=session)
        result = record.wait(30)
        assert session.text_of(record.id) == result
        texts.append((result, len(session.sent)))
    assert texts[0][0] == texts[1][0]
    assert texts[0][1] > 1  # streamed piece by piece, not at the end


def test_a_stopped_worker_holds_up_nobody_else(workers_runtime: Runtime) -> None:
    """A worker that stops reading (SIGSTOP) leaves its instances waiting; the engine steps on
    for the other worker's, and the stopped ones finish once it runs again."""
    rt = workers_runtime
    assert rt.workers is not None
    placed = _placed(rt)
    slow = [rt.launch("probe", ["generate-own-loop", "300", f"s{i}"]) for i in range(3)]
    time.sleep(0.2)
    stopped = rt.workers.workers[0].process.pid
    assert [r.worker for r in placed] == [0, 1, 0]
    os.kill(stopped, signal.SIGSTOP)
    try:
        quick = rt.launch("probe", ["generate", "50", "quick"])  # to worker 1, the less loaded
        assert json.loads(quick.wait(20)) == reference_generation(_tokens("quick"), 50)
        assert all(r.running for r in placed if r.worker == 0)
    finally:
        os.kill(stopped, signal.SIGCONT)
    for i, record in enumerate(slow):
        assert json.loads(record.wait(60)) == reference_generation(_tokens(f"s{i}"), 300)
