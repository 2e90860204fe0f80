"""Host side of the `kv` interface: the instance's KV contexts over the shared page pool.

Contexts are `pie.control` objects owned by the instance id; page accounting (quota, sharing,
copy-on-write) is the control layer's. The handle table is what lets cleanup close them all.
"""

from __future__ import annotations

from typing import Any

from pie.runtime.errors import HostError
from pie.runtime.host import model as model_host
from pie.runtime.host.state import InstanceHost

CONTEXT = "context"
MAX_NAME = 256


def get(host: InstanceHost, handle: int) -> Any:
    return host.handles.get(CONTEXT, handle)


def _name(name: str) -> str:
    if not name or len(name) > MAX_NAME:
        raise HostError(f"export names are 1 to {MAX_NAME} characters, got {len(name)}")
    return name


def _add(host: InstanceHost, ctx: Any) -> int:
    try:
        return host.handles.add(CONTEXT, ctx)
    except HostError:
        host.services.contexts.close(ctx)
        raise


def create(host: InstanceHost, model: int) -> int:
    model_host.info(host, model)  # checks the model handle
    return _add(host, host.services.contexts.create(host.id))


def fork(host: InstanceHost, handle: int) -> int:
    return _add(host, host.services.contexts.fork(get(host, handle)))


def length(host: InstanceHost, handle: int) -> int:
    return int(get(host, handle).length)


def page_count(host: InstanceHost, handle: int) -> int:
    return len(get(host, handle).pages)


def reserve(host: InstanceHost, handle: int, slots: int) -> None:
    host.services.contexts.preallocate(get(host, handle), slots)


def truncate(host: InstanceHost, handle: int, new_length: int) -> None:
    host.services.contexts.truncate(get(host, handle), new_length)


def mask(host: InstanceHost, handle: int, start: int, end: int, hidden: bool) -> None:
    host.services.contexts.mask(get(host, handle), start, end, hidden)


def export_context(host: InstanceHost, handle: int, name: str) -> None:
    host.services.contexts.export(get(host, handle), _name(name))


def import_context(host: InstanceHost, model: int, name: str) -> int:
    model_host.info(host, model)
    return _add(host, host.services.contexts.import_(host.id, _name(name)))


def unexport(host: InstanceHost, name: str) -> None:
    host.services.exports.unexport(host.id, _name(name))


def exports(host: InstanceHost) -> list[str]:
    return [str(n) for n in host.services.exports.list()]


def close(host: InstanceHost, handle: int) -> None:
    host.services.contexts.close(host.handles.pop(CONTEXT, handle))
