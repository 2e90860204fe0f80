"""Per-instance resource limits, with defaults that suit one interactive inferlet.

Memory is enforced by the store's limiter, CPU and wall time by epoch interruption plus timed
waits, KV pages by the pool's quota, open handles and children by the host's handle tables.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class InstanceLimits:
    """Limits of one inferlet instance; None disables a limit."""

    memory_bytes: int = 512 * 2**20
    # Time the guest spends running (host waits on futures and messages do not count).
    cpu_seconds: float | None = 60.0
    wall_seconds: float | None = 3600.0
    kv_pages: int | None = None
    open_handles: int = 4096
    # Children alive at once, and the depth of a launch chain (fork bombs stop here).
    max_children: int = 64
    max_depth: int = 4
    # Largest single message, blob or argument list a guest may hand the host. (wasmtime's own
    # per-call copy budget traps a list<u8> past ~2.8 M elements before this check runs.)
    max_message_bytes: int = 16 * 2**20
    # What the guest may write to stdout and stderr together (into the log); past it, the rest
    # is dropped and the instance is stopped.
    max_output_bytes: int | None = 16 * 2**20
