"""Chunked, content-addressed program uploads over the client protocol.

The client names the sha256 and size first; a program the server has is answered "have it"
and sent no more. Chunks must come in order, within the declared size; the last one is
checked against the hash and the component registered with the runtime (compiled off-loop).
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from typing import Any

from pie.server.frames import Chunk, FrameError, Upload, Uploaded, UploadProgress, UploadReady


@dataclass(slots=True)
class PendingUpload:
    hash: str
    size: int
    name: str | None
    data: bytearray = field(default_factory=bytearray)
    hasher: Any = field(default_factory=hashlib.sha256)


class Uploads:
    """The upload in progress on one connection (one at a time)."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self.pending: PendingUpload | None = None

    def known(self, digest: str) -> bool:
        return bool(self.state.runtime.has_program(digest))

    def begin(self, frame: Upload) -> UploadReady:
        config = self.state.config
        if frame.size > config.max_upload_bytes:
            raise FrameError(
                "too_large",
                f"a program of {frame.size} bytes is over this server's max_upload_bytes "
                f"({config.max_upload_bytes})",
                frame.id,
                "upload",
            )
        if self.pending is not None and self.pending.hash != frame.hash:
            raise FrameError(
                "out_of_order",
                f"the upload of {self.pending.hash[:12]} is not finished; send its remaining "
                f"{self.pending.size - len(self.pending.data)} bytes first",
                frame.id,
                "upload",
            )
        have = self.known(frame.hash)
        if have:
            self.pending = None
        elif frame.size == 0:
            raise FrameError("bad_frame", "an upload of 0 bytes cannot be a program", frame.id)
        else:
            self.pending = PendingUpload(frame.hash, frame.size, frame.name)
        return UploadReady(
            id=frame.id, hash=frame.hash, have=have, chunk_bytes=config.upload_chunk_bytes
        )

    def take_chunk(self, frame: Chunk) -> UploadProgress | PendingUpload:
        """Adds a chunk: progress, or the finished upload (hash verified) to register."""
        pending = self.pending
        if pending is None or pending.hash != frame.hash:
            raise FrameError(
                "out_of_order",
                f"a chunk of {frame.hash[:12]} without its upload frame first",
                frame.id,
                "chunk",
            )
        if frame.offset != len(pending.data):
            raise FrameError(
                "out_of_order",
                f"chunk at offset {frame.offset}, expected {len(pending.data)}",
                frame.id,
                "chunk",
            )
        end = len(pending.data) + len(frame.data)
        if end > pending.size:
            self.pending = None
            raise FrameError(
                "too_large",
                f"chunk runs to byte {end}, past the declared size {pending.size}; upload dropped",
                frame.id,
                "chunk",
            )
        pending.data += frame.data
        pending.hasher.update(frame.data)
        if end < pending.size:
            return UploadProgress(id=frame.id, hash=frame.hash, received=end)
        self.pending = None
        digest = pending.hasher.hexdigest()
        if digest != pending.hash:
            raise FrameError(
                "hash_mismatch",
                f"the bytes received hash to {digest}, not {pending.hash}; upload dropped",
                frame.id,
                "chunk",
            )
        return pending

    async def register(self, upload: PendingUpload, frame_id: int | None) -> Uploaded:
        """Compiles and registers the finished upload (off the event loop)."""
        runtime = self.state.runtime
        try:
            digest = await asyncio.to_thread(runtime.add_component, bytes(upload.data), upload.name)
        except Exception as e:  # wasmtime says why the bytes are not a component
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FrameError(
                "bad_component",
                f"the upload is not a loadable inferlet component: {first}",
                frame_id,
                "chunk",
            ) from None
        name = runtime.program(digest).name
        return Uploaded(id=frame_id, hash=digest, name=name)
