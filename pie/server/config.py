"""`ServerConfig`: every setting of `pie serve`, from defaults, a TOML file and CLI flags.

Precedence: flags > the file's values > defaults. The file uses the same names as the fields
(`kv_pages = 512`, `[limits]`-free: instance limits are plain keys `memory_mb`, ...).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pie.control.pacing import DECODE_LATENCY_FACTOR
from pie.control.snapshots import LOCAL_USER, SnapshotSettings
from pie.runtime.host.mcp import grant
from pie.runtime.limits import KV_SHARE, LOOPBACK, InstanceLimits


class ConfigError(ValueError):
    """A config file or flag is wrong; the message names the key and what to do."""


@dataclass
class ServerConfig:
    """Settings of one `pie serve` process."""

    host: str = "127.0.0.1"
    port: int = 8080
    model: str | None = None  # GGUF file or HF folder; None: the embedded SmolLM2
    device: str = "cpu"
    dtype: str = "auto"  # auto | float32 | bfloat16
    kv_pages: int | None = None  # None: sized to memory (Engine.load, pages_for_memory)
    # Instance worker processes (0: in-process; None: the runtime's default), where supported.
    workers: int | None = None
    max_instances: int = 256
    max_batch_tokens: int = 512
    # Prompt tokens beside running decoders are paced so a step stays within this many times a
    # decode-only step (pie/control/pacing.py); 0 turns pacing off (the token budget alone).
    decode_latency_factor: float = DECODE_LATENCY_FACTOR
    # The KV pages an instance may hold by default, as a share of the pool (at least one full
    # context); 1 lets one instance take the whole pool.
    kv_share: float = KV_SHARE
    # Automatic prefix caching: full KV pages kept by their tokens and reused by later prompts
    # with the same prefix (the OpenAI endpoints' repeated system prompts and conversations).
    prefix_cache: bool = True
    # Hosts inferlets may reach over HTTP (exact names or "*.domain"); a launch may ask for
    # fewer. Loopback only by default.
    http_hosts: list[str] = field(default_factory=lambda: list(LOOPBACK))
    # MCP servers inferlets may use (`mcp` interface), by name: `[mcp_servers.NAME]` with
    # `url = "http://127.0.0.1:PORT/mcp"` (streamable HTTP) or `command = ["prog", "arg"]`
    # (stdio, started on first use in each process that runs instances). None by default.
    mcp_servers: dict[str, Any] = field(default_factory=dict)
    # Named KV snapshots (Context.save): how long one lives unless its save says otherwise, the
    # longest a save may ask, pages a user may keep in them (None: a quarter of the pool), and
    # a folder that keeps them across restarts (None: in memory only).
    snapshot_ttl_s: float = 3600.0
    snapshot_max_ttl_s: float = 7 * 86400.0
    snapshot_quota_pages: int | None = None
    snapshot_dir: str | None = None
    # Bearer token clients must present; None admits loopback clients only.
    token: str | None = None
    max_frame_bytes: int = 4 * 2**20  # largest WebSocket frame the protocol accepts
    max_upload_bytes: int = 128 * 2**20  # largest uploaded component
    upload_chunk_bytes: int = 1 * 2**20  # chunk size the server asks uploaders for
    # Events buffered for one connection (or one detached instance) before it counts as stuck.
    max_buffered_bytes: int = 64 * 2**20
    detached_ttl_s: float = 600.0  # how long a finished detached instance waits to be attached
    drain_grace_s: float = 10.0  # on SIGTERM/SIGINT: how long running instances may finish
    # Limits of each launched instance.
    memory_mb: int = 512
    cpu_seconds: float | None = 60.0
    wall_seconds: float | None = 3600.0
    cors_origins: list[str] = field(default_factory=list)  # [] = no CORS headers
    web_root: str | None = None  # a folder with index.html to serve at / (default: built in)
    log_level: str = "info"

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str] | None, **flags: Any) -> ServerConfig:
        """The file's settings (if `path`), overridden by every flag that is not None."""
        values: dict[str, Any] = {}
        if path is not None:
            try:
                with Path(path).open("rb") as f:
                    values = tomllib.load(f)
            except FileNotFoundError:
                raise ConfigError(f"config file {path} does not exist") from None
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
            values = values.get("server", values)  # either top level or a [server] table
        values.update({k: v for k, v in flags.items() if v is not None})
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ServerConfig:
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Raises ConfigError naming the first setting that cannot work."""
        positive = [] if self.kv_pages is None else ["kv_pages"]  # None: sized to memory
        positive += ["max_instances", "max_batch_tokens", "max_frame_bytes"]
        positive += ["max_upload_bytes", "upload_chunk_bytes", "max_buffered_bytes", "memory_mb"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.port, int) or not 0 <= self.port < 65536:
            raise ConfigError(f"port must be 0-65535, got {self.port!r}")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 0):
            raise ConfigError(f"workers must be 0 (in-process) or more, got {self.workers!r}")
        if self.upload_chunk_bytes + 4096 > self.max_frame_bytes:
            raise ConfigError(
                f"upload_chunk_bytes ({self.upload_chunk_bytes}) must leave 4096 bytes of "
                f"headroom under max_frame_bytes ({self.max_frame_bytes})"
            )
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.decode_latency_factor != 0 and self.decode_latency_factor < 1:
            raise ConfigError(
                f"decode_latency_factor must be 0 (off) or at least 1, got "
                f"{self.decode_latency_factor}"
            )
        if not 0 < self.kv_share <= 1:
            raise ConfigError(f"kv_share must be in (0, 1], got {self.kv_share}")
        if self.drain_grace_s < 0:
            raise ConfigError(f"drain_grace_s must be 0 or more, got {self.drain_grace_s}")
        if not 0 < self.snapshot_ttl_s <= self.snapshot_max_ttl_s:
            raise ConfigError(
                f"snapshot_ttl_s must be in (0, snapshot_max_ttl_s = {self.snapshot_max_ttl_s}], "
                f"got {self.snapshot_ttl_s}"
            )
        quota = self.snapshot_quota_pages
        if quota is not None and (not isinstance(quota, int) or quota < 1):
            raise ConfigError(f"snapshot_quota_pages must be a positive integer, got {quota!r}")
        if not isinstance(self.mcp_servers, dict):
            raise ConfigError(f"mcp_servers must be a table of servers, got {self.mcp_servers!r}")
        try:
            self.mcp_grants()
        except ValueError as e:
            raise ConfigError(f"mcp_servers: {e}") from None
        if self.token is not None and not self.token:
            raise ConfigError("token must not be empty; leave it out to admit loopback only")

    def instance_limits(self) -> InstanceLimits:
        return InstanceLimits(
            memory_bytes=self.memory_mb * 2**20,
            cpu_seconds=self.cpu_seconds,
            wall_seconds=self.wall_seconds,
            http_hosts=tuple(self.http_hosts),
            mcp_servers=self.mcp_grants(),
            user=self.user(),
        )

    def mcp_grants(self) -> tuple[tuple[str, str], ...]:
        """The MCP servers as (name, target) pairs, the form instances are granted them in."""
        return tuple(grant(name, spec) for name, spec in self.mcp_servers.items())

    def user(self) -> str:
        """Whom this server's clients are, as owners of KV snapshots. Admission knows one
        identity: holding the token (every holder is the same user), or, with no token,
        being on this machine (the local user, as in `pie run`)."""
        if self.token is None:
            return LOCAL_USER
        return "token:" + hashlib.sha256(self.token.encode()).hexdigest()[:16]

    def snapshot_settings(self) -> SnapshotSettings:
        return SnapshotSettings(
            ttl_s=self.snapshot_ttl_s,
            max_ttl_s=self.snapshot_max_ttl_s,
            quota_pages=self.snapshot_quota_pages,
            directory=self.snapshot_dir,
        )
