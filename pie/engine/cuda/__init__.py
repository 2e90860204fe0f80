"""The CUDA backend of the engine: Triton paged attention, fused RMSNorm/RoPE, decode CUDA graphs.

`TritonAttention` (and the kernel modules) need `triton`; it is imported on first use, so the
torch-only parts (metadata tables, CUDA-graph buckets) load on machines without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pie.engine.cuda.backend import TritonAttention

__all__ = ["TritonAttention"]


def __getattr__(name: str) -> Any:
    if name == "TritonAttention":
        try:
            from pie.engine.cuda.backend import TritonAttention
        except ImportError as exc:
            raise ImportError(
                f"the triton attention backend needs Triton ({exc}): "
                "`pip install 'pie-python[gpu]'`, or pick attention='torch'"
            ) from exc
        return TritonAttention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
