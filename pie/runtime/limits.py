"""Per-instance resource limits, with defaults that suit one interactive inferlet.

Memory is enforced by the store's limiter, CPU and wall time by epoch interruption plus timed
waits, KV pages by the pool's quota, open handles and children by the host's handle tables.
"""

from __future__ import annotations

from dataclasses import dataclass

LOOPBACK = ("127.0.0.1", "localhost", "::1")  # the hosts an inferlet may call by default

# The default page quota of an instance launched without `kv_pages`, as a share of the pool
# (never less than one context of the model's full length: `plane.default_quota`).
KV_SHARE = 0.5


@dataclass(frozen=True, slots=True)
class InstanceLimits:
    """Limits of one inferlet instance; None disables a limit."""

    memory_bytes: int = 512 * 2**20
    # Time the guest spends running (host waits on futures and messages do not count).
    cpu_seconds: float | None = 60.0
    wall_seconds: float | None = 3600.0
    # KV pages the instance may hold; None: the runtime's default share of the pool.
    kv_pages: int | None = None
    # Pages set aside for it at launch (a claimed budget, as Pie's `token_budget`): no other
    # instance can take them, and the launch fails at once if the pool cannot.
    kv_reserve: int = 0
    # Rank in the wait for KV pages when the pool is short: higher goes first (default 0).
    priority: int = 0
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
    # The result or error text an instance ends with: past it the head is kept and the rest
    # cut, with a note of how much (the text goes to the client, the log and a terminal).
    max_result_bytes: int = 4 * 2**20
    # Outgoing HTTP (`http` interface): the hosts it may reach (exact names, or "*.domain"),
    # requests in flight at once, and the most one exchange may take. A response may be up to
    # `max_message_bytes`.
    http_hosts: tuple[str, ...] = LOOPBACK
    http_in_flight: int = 8
    http_timeout_s: float = 30.0
    # Who launched it (not a limit, but it travels with the launch like one, and children
    # inherit it): the owner of the KV snapshots it saves, and the only one whose snapshots
    # it may list or open. `pie run` has one local user; `pie serve` names the client's identity.
    user: str = "local"
    # MCP servers (`mcp` interface) it may use: (name, target) pairs, the target a streamable-
    # HTTP URL or a stdio command line; none by default (the server's `mcp_servers` grants
    # them). Calls in flight at once, and the most one call (connecting included) may take.
    mcp_servers: tuple[tuple[str, str], ...] = ()
    mcp_in_flight: int = 8
    mcp_timeout_s: float = 30.0
