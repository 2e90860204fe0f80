"""Where the WIT contract lives, and the names the runtime and the build derive from it.

The WIT package ships inside `pie/wit/` as package data; its content hash keys every cache that
depends on the contract (built components, generated bindings).
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

PACKAGE = "pie:inferlet"
VERSION = "0.1.0"
WORLD = "inferlet"
INTERFACES = (
    "runtime",
    "poll",
    "model",
    "kv",
    "forward",
    "session",
    "messaging",
    "http",
    "mcp",
    "grammar",
)


def wit_dir() -> Path:
    """The directory of the `pie:inferlet` WIT package."""
    return Path(__file__).resolve().parent.parent / "wit"


def interface_name(interface: str) -> str:
    """The fully qualified import name, e.g. `pie:inferlet/kv@0.1.0`."""
    return f"{PACKAGE}/{interface}@{VERSION}"


@cache
def wit_hash() -> str:
    """sha256 over the WIT files (names and contents), stable across machines."""
    digest = hashlib.sha256()
    for path in sorted(wit_dir().glob("*.wit")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()
