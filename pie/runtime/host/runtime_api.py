"""Host side of the `runtime` interface: identity, arguments, models, child inferlets.

Children are launched by the control process (it knows every instance, checks the depth and
child limits, and ends a parent's children with it); here is the handle of their result.
"""

from __future__ import annotations

from pie.runtime.errors import HostError
from pie.runtime.host import futures
from pie.runtime.host.state import InstanceHost


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


def launch(host: InstanceHost, program_ref: str, args: list[str]) -> int:
    """Starts a child; returns a future resolved with its result (or its error)."""
    if sum(len(a) for a in args) > host.limits.max_message_bytes:
        raise HostError(f"launch arguments exceed {host.limits.max_message_bytes} bytes")
    child, done = host.control.launch_child(program_ref, list(args))
    return futures.add(host, "child", done, child)


def cancel(host: InstanceHost, handle: int) -> None:
    entry = host.handles.get(futures.KIND, handle)
    if entry.what != "child":
        raise HostError(f"future {handle} is a {entry.what} future, not a child")
    host.control.cancel_child(entry.owner_object, f"cancelled by its parent (instance {host.id})")
