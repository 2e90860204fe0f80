"""`SnapshotDisk`: KV snapshots in a directory (`--snapshot-dir`), so they outlive the process.

Each snapshot is two files named by a hash of (user, name): `KEY.kv`, its pages' KV as the
engine's save path gives it (`Engine.save_pages`, written by `engine.write_saved_pages`), and
`KEY.json`, a small header: the format, the engine's fingerprint (model, config, dtype, page
size, KV shape), user, name, length, tokens, hidden ranges, page count and expiry (wall time).
Both are written to a temporary file and renamed into place, the header last: a header on disk
always has its KV beside it. Control code never imports torch: reading and writing the KV is the
engine's (`KvFiles`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Protocol

from pie.control.snapshots import Snapshot, SnapshotContent, SnapshotError

log = logging.getLogger(__name__)

FORMAT = "pie-kv-snapshot/1"


class KvFiles(Protocol):
    """The engine's side: who it is, and its saved-pages data to and from a file."""

    def kv_fingerprint(self) -> dict[str, Any]: ...
    def write_saved_pages(self, data: Any, path: Path) -> None: ...
    def read_saved_pages(self, path: Path) -> Any: ...


class SnapshotDisk:
    """Snapshot files in one directory, for one engine (the fingerprint it refuses others by)."""

    def __init__(self, directory: str | os.PathLike[str], engine: KvFiles) -> None:
        self.root = Path(directory)
        self.root.mkdir(parents=True, exist_ok=True)
        self.engine = engine
        self.fingerprint = engine.kv_fingerprint()

    def write(self, snap: Snapshot, data: Any) -> str:
        """Writes `snap` and its pages' KV `data` atomically; returns its key (file stem)."""
        key = file_key(snap.user, snap.name)
        kv_path = self.root / f"{key}.kv"
        tmp = self.root / f".{key}.kv.tmp"
        self.engine.write_saved_pages(data, tmp)
        os.replace(tmp, kv_path)
        content = snap.content
        header = {
            "format": FORMAT,
            "engine": self.fingerprint,
            "user": snap.user,
            "name": snap.name,
            "length": content.length,
            "tokens": None if content.tokens is None else list(content.tokens),
            "hidden": [list(r) for r in content.hidden],
            "pages": snap.page_count,
            "expires_at": snap.expires_at,
        }
        _write_atomic(self.root / f"{key}.json", json.dumps(header).encode())
        return key

    def read(self, snap: Snapshot) -> Any:
        """The saved KV of `snap` (in the order of its pages)."""
        path = self.root / f"{snap.key}.kv"
        try:
            return self.engine.read_saved_pages(path)
        except FileNotFoundError:
            raise SnapshotError(
                f"snapshot {snap.name!r}: its KV file {path} is gone; delete the snapshot"
            ) from None

    def remove(self, key: str) -> None:
        for suffix in (".json", ".kv"):  # the header first: a .kv alone is never listed
            with contextlib.suppress(FileNotFoundError):
                (self.root / f"{key}{suffix}").unlink()

    def scan(self, now: float) -> list[Snapshot]:
        """The snapshots in the directory (not yet loaded: `pages` None). Expired ones are
        removed; one saved for another engine is listed with a `refusal` saying why."""
        found: list[Snapshot] = []
        for path in sorted(self.root.glob("*.json")):
            try:
                header = json.loads(path.read_bytes())
                snap = self._snapshot(header, path.stem)
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("snapshot header %s is unreadable (%s); skipped", path, e)
                continue
            if snap.expires_at <= now:
                self.remove(snap.key)
                continue
            found.append(snap)
        for tmp in self.root.glob(".*.tmp"):  # a write cut short by a crash
            with contextlib.suppress(OSError):
                tmp.unlink()
        return found

    def _snapshot(self, header: dict[str, Any], key: str) -> Snapshot:
        if header.get("format") != FORMAT:
            raise ValueError(f"format {header.get('format')!r}, expected {FORMAT!r}")
        tokens = header["tokens"]
        content = SnapshotContent(
            int(header["length"]),
            None if tokens is None else tuple(int(t) for t in tokens),
            tuple((int(a), int(b)) for a, b in header["hidden"]),
        )
        snap = Snapshot(
            str(header["user"]),
            str(header["name"]),
            content,
            int(header["pages"]),
            float(header["expires_at"]),
            key=key,
        )
        saved = header["engine"]
        if saved != self.fingerprint:
            snap.refusal = (
                f"snapshot {snap.name!r} was saved for {describe(saved)}; this server runs "
                f"{describe(self.fingerprint)}: it cannot be opened here (delete it, or open it "
                "on a server with that model, dtype and page size)"
            )
        return snap


def describe(fingerprint: dict[str, Any]) -> str:
    return (
        f"model {fingerprint.get('model')!r} (config {str(fingerprint.get('config'))[:12]}, "
        f"dtype {fingerprint.get('dtype')}, page size {fingerprint.get('page_size')})"
    )


def file_key(user: str, name: str) -> str:
    """A file stem for (user, name): any characters in either, no collisions between users."""
    return hashlib.sha256(f"{user}\0{name}".encode()).hexdigest()[:40]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
