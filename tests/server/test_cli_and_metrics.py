"""`pie run --server` against the shared server, `/metrics` after real work, and the config
file merged with flags."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pie.client import InstanceError, PieClient
from pie.server.config import ConfigError, ServerConfig
from tests.server.conftest import CHATTY, ROOT, ServerProcess, run


def test_config_file_merged_with_flags(tmp_path: Path) -> None:
    path = tmp_path / "pie.toml"
    path.write_text('[server]\nport = 9000\nkv_pages = 64\ntoken = "t"\ndrain_grace_s = 1.5\n')
    config = ServerConfig.from_toml(path, port=9100, host=None)
    assert (config.port, config.kv_pages, config.token, config.drain_grace_s) == (
        9100,
        64,
        "t",
        1.5,
    )
    assert config.host == "127.0.0.1"  # a flag left out keeps the file's or the default
    path.write_text("kv_page = 64\n")
    with pytest.raises(ConfigError, match=r"unknown setting.*kv_page"):
        ServerConfig.from_toml(path)
    with pytest.raises(ConfigError, match="kv_pages must be a positive integer"):
        ServerConfig.from_toml(None, kv_pages=0)
    with pytest.raises(ConfigError, match="does not exist"):
        ServerConfig.from_toml(tmp_path / "missing.toml")


def _pie_run(
    server: ServerProcess, *args: str, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pie.cli", "run", str(CHATTY), "--server", server.http]
    return subprocess.run(
        [*command, "--", *args],
        cwd=ROOT,
        env=dict(os.environ),  # the session's PIE_CACHE_DIR: the build is cached
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_pie_run_with_server(server: ServerProcess, chatty: str) -> None:
    streamed = _pie_run(server, "stream", "5")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.strip()
    echoed = _pie_run(server, "echo", stdin="hi there\nbye\n")
    assert echoed.returncode == 0, echoed.stderr
    assert echoed.stdout.splitlines() == ["echo:hi there", "bye"]
    failed = _pie_run(server, "fail")
    assert failed.returncode == 1 and "asked to fail" in failed.stderr
    spoke = _pie_run(server, "speak")
    assert "[stdout] to stdout" in spoke.stderr and spoke.stdout.strip() == "spoke"


def _samples(server: ServerProcess) -> dict[str, float]:
    text = httpx.get(server.http + "/metrics", timeout=10).text
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


@pytest.mark.slow
def test_metrics_follow_the_work(server: ServerProcess, chatty: str) -> None:
    before = _samples(server)

    async def go() -> None:
        async with PieClient.connect(server.url) as client:
            assert (await (await client.launch(chatty, ["stream", "6"])).wait()).strip()
            with pytest.raises(InstanceError):
                await (await client.launch(chatty, ["fail"])).wait()

    run(go())
    after = _samples(server)
    key = "pie_launches_total{source=ws}"
    assert after[key] - before.get(key, 0) == 2
    failed = "pie_errors_total{kind=instance_failed}"
    assert after[failed] - before.get(failed, 0) >= 1
    assert after["pie_kv_pages_total"] == 320
    assert after["pie_kv_pages_free"] + after["pie_kv_pages_used"] == 320
    assert after["pie_instances_running"] >= 0
    assert after["pie_batch_sequences_count"] > before.get("pie_batch_sequences_count", 0)
    assert after["pie_engine_tokens_total"] > before.get("pie_engine_tokens_total", 0)
    assert after["pie_launch_wait_seconds_count"] >= 2
    health = httpx.get(server.http + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["model"] == "smollm2-135m-instruct"
