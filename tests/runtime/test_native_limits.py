"""Native mode (`pie run --native`) stops a guest computing in Python: at its wall-time and
CPU-time limits, on a cancel, and when the guest catches what stops it; host state stays whole.

Each guest is a small file written here and run natively on the fake engine (no build).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pie.runtime.errors import InstanceFailed
from pie.runtime.limits import InstanceLimits
from pie.runtime.runtime import Runtime
from tests.runtime.conftest import ROOT, assert_pool_whole
from tests.runtime.fakes import FakeEngine

BUSY = "def main(args):\n    while True:\n        pass\n"
# A guest that swallows every error and loops on (the stop is no `Exception`).
STUBBORN = """
def main(args):
    while True:
        try:
            while True:
                pass
        except Exception:
            pass
"""
# A guest that catches the stop itself, then returns as if nothing happened.
CATCHING = """
def main(args):
    try:
        while True:
            pass
    except BaseException:
        return "escaped"
"""
# Computing between host calls: the stop may come inside or outside one.
CALLING = """
from pie.sdk import Context, instance_id

def main(args):
    while True:
        ctx = Context()
        ctx.fill("a")
        instance_id()
        ctx.close()
"""


@pytest.fixture
def native_runtime(pie_cache: Path) -> Runtime:
    return Runtime(FakeEngine(num_pages=64, page_size=4), cache=pie_cache, workers=0)


def _launch(rt: Runtime, tmp_path: Path, source: str, **limits: float) -> tuple[object, float]:
    path = tmp_path / "guest.py"
    path.write_text(source)
    program = rt.add_source(path, native=True)
    began = time.monotonic()
    return rt.launch(program, [], native=True, limits=InstanceLimits(**limits)), began  # type: ignore[arg-type]


def _failure(instance: object, within: float) -> str:
    with pytest.raises(InstanceFailed) as failed:
        instance.wait(within)  # type: ignore[attr-defined]
    return str(failed.value)


@pytest.mark.parametrize("source", [BUSY, STUBBORN, CALLING], ids=["busy", "stubborn", "calling"])
def test_a_native_busy_loop_stops_at_its_wall_limit(
    native_runtime: Runtime, tmp_path: Path, source: str
) -> None:
    with native_runtime as rt:
        instance, began = _launch(rt, tmp_path, source, wall_seconds=1.0, cpu_seconds=60.0)
        message = _failure(instance, within=1.0 + 1.0)
        took = time.monotonic() - began
        assert message.endswith("ended: wall-time limit of 1.0 s reached"), message
        assert 1.0 <= took < 2.0, took
        assert_pool_whole(rt)


def test_a_native_busy_loop_stops_at_its_cpu_limit(native_runtime: Runtime, tmp_path: Path) -> None:
    with native_runtime as rt:
        instance, began = _launch(rt, tmp_path, BUSY, wall_seconds=60.0, cpu_seconds=0.5)
        message = _failure(instance, within=0.5 + 1.0)
        assert message.endswith("ended: CPU-time limit of 0.5 s reached"), message
        assert time.monotonic() - began < 1.5


def test_a_cancel_stops_a_native_busy_loop_at_once(native_runtime: Runtime, tmp_path: Path) -> None:
    with native_runtime as rt:
        instance, _ = _launch(rt, tmp_path, STUBBORN, wall_seconds=60.0, cpu_seconds=60.0)
        time.sleep(0.2)
        began = time.monotonic()
        instance.cancel("interrupted (Ctrl-C)")  # type: ignore[attr-defined]
        message = _failure(instance, within=1.0)
        assert message.endswith("ended: interrupted (Ctrl-C)"), message
        assert time.monotonic() - began < 0.5


def test_a_guest_that_catches_the_stop_still_fails(native_runtime: Runtime, tmp_path: Path) -> None:
    with native_runtime as rt:
        instance, _ = _launch(rt, tmp_path, CATCHING, wall_seconds=0.5, cpu_seconds=60.0)
        message = _failure(instance, within=1.5)
        assert message.endswith("ended: wall-time limit of 0.5 s reached"), message


def test_the_watch_never_raises_into_a_finished_instance(
    native_runtime: Runtime, tmp_path: Path
) -> None:
    """A guest that returns just as its limit passes either fails with the limit or returns;
    its thread's later work (cleanup, the next instance) is never hit."""
    source = "import time\ndef main(args):\n    end = time.monotonic() + 0.3\n"
    source += "    while time.monotonic() < end:\n        pass\n    return 'done'\n"
    with native_runtime as rt:
        for _ in range(3):
            instance, _ = _launch(rt, tmp_path, source, wall_seconds=0.3, cpu_seconds=60.0)
            try:
                assert instance.wait(2.0) == "done"  # type: ignore[attr-defined]
            except InstanceFailed as e:
                assert "wall-time limit of 0.3 s reached" in str(e)
        ok, _ = _launch(rt, tmp_path, "def main(args):\n    return 'fine'\n", wall_seconds=5.0)
        assert ok.wait(2.0) == "fine"  # type: ignore[attr-defined]
        assert_pool_whole(rt)


# ---- `pie run --native` --------------------------------------------------------------------------
LOOP = "from pie.sdk import send\n\ndef main(args):\n    send('started\\n')\n    while True:\n        pass\n"


def _pie_run(tmp_path: Path, *flags: str) -> subprocess.Popen[str]:
    path = tmp_path / "loop.py"
    path.write_text(LOOP)
    return subprocess.Popen(
        [sys.executable, "-m", "pie.cli", "run", "--native", *flags, str(path)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _started(process: subprocess.Popen[str]) -> float:
    """Waits for the guest's first line (the model loads first); returns when it came."""
    assert process.stdout is not None
    assert process.stdout.readline() == "started\n"
    return time.monotonic()


@pytest.mark.slow
def test_pie_run_native_stops_a_busy_loop_at_its_wall_limit(tmp_path: Path) -> None:
    process = _pie_run(tmp_path, "--wall-seconds", "2")
    began = _started(process)
    _, stderr = process.communicate(timeout=60)
    took = time.monotonic() - began
    assert process.returncode == 1, stderr
    assert "pie run: instance 1 (loop) ended: wall-time limit of 2.0 s reached" in stderr
    assert took < 2.0 + 1.0, took  # the limit counts from the launch, before "started"


@pytest.mark.slow
def test_ctrl_c_ends_pie_run_native_promptly_without_a_traceback(tmp_path: Path) -> None:
    process = _pie_run(tmp_path)
    _started(process)
    time.sleep(0.3)
    began = time.monotonic()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    took = time.monotonic() - began
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "pie run: interrupted (Ctrl-C)"
    assert took < 2.0, took


def test_pie_run_native_refuses_a_memory_limit(tmp_path: Path) -> None:
    process = _pie_run(tmp_path, "--memory-mb", "64")
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "--memory-mb cannot apply with --native" in stderr
