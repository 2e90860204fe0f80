"""Compiled components, cached by content hash in memory and serialized on disk.

Compiling an 18 MB componentize-py component takes ~3 s; deserializing the artifact ~2 ms. An
artifact is only valid for the wasmtime version and engine configuration that made it, so both
are part of the key.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from importlib import metadata
from pathlib import Path

import wasmtime
from wasmtime import component as wc

log = logging.getLogger(__name__)


class ComponentCache:
    """Compiles each distinct component once per process and once per machine."""

    def __init__(self, engine: wasmtime.Engine, config_key: str, directory: Path | None) -> None:
        self.engine = engine
        self.key = f"wasmtime-{metadata.version('wasmtime')}-{config_key}"
        self.directory = directory
        self._memory: dict[str, wc.Component] = {}
        self._lock = threading.Lock()

    def load(self, wasm: bytes) -> tuple[str, wc.Component]:
        """(content hash, compiled component) of the component bytes `wasm`."""
        digest = hashlib.sha256(wasm).hexdigest()
        with self._lock:
            found = self._memory.get(digest)
        if found is not None:
            return digest, found
        compiled = self._from_disk(digest) or self._compile(digest, wasm)
        with self._lock:
            self._memory.setdefault(digest, compiled)
            return digest, self._memory[digest]

    def load_file(self, digest: str, path: Path) -> wc.Component:
        """The component `digest`, deserialized from an artifact this cache's key made (a
        worker loads what its control process compiled)."""
        with self._lock:
            found = self._memory.get(digest)
        if found is None:
            found = wc.Component.deserialize_file(self.engine, str(path))
            with self._lock:
                found = self._memory.setdefault(digest, found)
        return found

    def artifact(self, digest: str, wasm: bytes) -> Path:
        """Where the compiled artifact of `digest` lies on disk (written now if missing)."""
        path = self._path(digest)
        if path is None:
            raise ValueError("this component cache keeps nothing on disk")
        if not path.exists():
            self._compile(digest, wasm)
        return path

    def _path(self, digest: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{digest}-{self.key}.cwasm"

    def _from_disk(self, digest: str) -> wc.Component | None:
        path = self._path(digest)
        if path is None or not path.exists():
            return None
        try:
            return wc.Component.deserialize_file(self.engine, str(path))
        except wasmtime.WasmtimeError as e:  # stale or corrupt artifact: recompile
            log.warning("discarding cached component %s: %s", path, e)
            path.unlink(missing_ok=True)
            return None

    def _compile(self, digest: str, wasm: bytes) -> wc.Component:
        compiled = wc.Component(self.engine, wasm)
        path = self._path(digest)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(compiled.serialize())
            os.replace(tmp, path)
        return compiled
