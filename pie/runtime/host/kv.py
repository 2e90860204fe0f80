"""Host side of the `kv` interface: the instance's KV contexts, kept by the control plane.

A context handle is allocated here, in the instance's handle table, and names the context in
the control plane too (the plane keys the instance's contexts by it). Page accounting (quota,
sharing, copy-on-write) is the control layer's; the handle table is what lets the host check
every handle it is given.
"""

from __future__ import annotations

from pie.runtime.errors import HostError
from pie.runtime.host import model as model_host
from pie.runtime.host.state import InstanceHost

CONTEXT = "context"
MAX_NAME = 256


def get(host: InstanceHost, handle: int) -> int:
    host.handles.get(CONTEXT, handle)
    return handle


def _name(name: str) -> str:
    if not name or len(name) > MAX_NAME:
        raise HostError(f"names are 1 to {MAX_NAME} characters, got {len(name)}")
    return name


def _new(host: InstanceHost, make: object) -> int:
    """A fresh context handle, made in the control plane by `make(handle)`."""
    handle = host.handles.add(CONTEXT, None)
    try:
        make(handle)  # type: ignore[operator]
    except BaseException:
        host.handles.pop(CONTEXT, handle)
        raise
    return handle


def create(host: InstanceHost, model: int) -> int:
    model_host.info(host, model)  # checks the model handle
    return _new(host, host.control.kv_create)


def fork(host: InstanceHost, handle: int) -> int:
    src = get(host, handle)
    return _new(host, lambda new: host.control.kv_fork(src, new))


def length(host: InstanceHost, handle: int) -> int:
    return host.control.kv_length(get(host, handle))


def page_count(host: InstanceHost, handle: int) -> int:
    return host.control.kv_page_count(get(host, handle))


def reserve(host: InstanceHost, handle: int, slots: int) -> None:
    host.control.kv_reserve(get(host, handle), slots)


def truncate(host: InstanceHost, handle: int, new_length: int) -> None:
    host.control.kv_truncate(get(host, handle), new_length)


def mask(host: InstanceHost, handle: int, start: int, end: int, hidden: bool) -> None:
    host.control.kv_mask(get(host, handle), start, end, hidden)


def export_context(host: InstanceHost, handle: int, name: str) -> None:
    host.control.kv_export(get(host, handle), _name(name))


def import_context(host: InstanceHost, model: int, name: str) -> int:
    model_host.info(host, model)
    checked = _name(name)
    return _new(host, lambda new: host.control.kv_import(new, checked))


def unexport(host: InstanceHost, name: str) -> None:
    host.control.kv_unexport(_name(name))


def exports(host: InstanceHost) -> list[str]:
    return host.control.kv_exports()


def save_snapshot(host: InstanceHost, handle: int, name: str, ttl_s: int | None) -> None:
    host.control.kv_save(get(host, handle), _name(name), ttl_s)


def open_snapshot(host: InstanceHost, model: int, name: str) -> int:
    model_host.info(host, model)
    checked = _name(name)
    return _new(host, lambda new: host.control.kv_open(new, checked))


def delete_snapshot(host: InstanceHost, name: str) -> None:
    host.control.kv_snapshot_delete(_name(name))


def snapshots(host: InstanceHost) -> list[str]:
    return host.control.kv_snapshots()


def close(host: InstanceHost, handle: int) -> None:
    host.handles.pop(CONTEXT, handle)
    host.control.kv_close(handle)
