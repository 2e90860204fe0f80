"""Host side of the `runtime` interface: identity, arguments, models, child inferlets."""

from __future__ import annotations

from pie.runtime.errors import HostError
from pie.runtime.host import futures
from pie.runtime.host.state import ChildHandle, InstanceHost


def version(host: InstanceHost) -> str:
    return host.services.version


def instance_id(host: InstanceHost) -> int:
    return host.id


def arguments(host: InstanceHost) -> list[str]:
    return list(host.args)


def models(host: InstanceHost) -> list[str]:
    return host.services.model_names


def program(host: InstanceHost) -> str:
    return host.program


def live_children(host: InstanceHost) -> list[ChildHandle]:
    host.children = [c for c in host.children if not c.done.done()]
    return host.children


def launch(host: InstanceHost, program_ref: str, args: list[str]) -> int:
    """Starts a child; returns a future resolved with its result (or its error)."""
    limits = host.limits
    if host.depth + 1 > limits.max_depth:
        raise HostError(
            f"launch depth limit reached ({limits.max_depth}): a child may not launch "
            "children this deep"
        )
    if len(live_children(host)) >= limits.max_children:
        raise HostError(
            f"child limit reached ({limits.max_children} running): await or cancel children first"
        )
    if sum(len(a) for a in args) > limits.max_message_bytes:
        raise HostError(f"launch arguments exceed {limits.max_message_bytes} bytes")
    child = host.services.launch(host, program_ref, list(args))
    host.children.append(child)
    return futures.add(host, "child", child.done, child)


def cancel(host: InstanceHost, handle: int) -> None:
    entry = host.handles.get(futures.KIND, handle)
    if entry.what != "child":
        raise HostError(f"future {handle} is a {entry.what} future, not a child")
    entry.owner_object.cancel(f"cancelled by its parent (instance {host.id})")
