"""The engine's CPU memory helpers (pie.engine.cpu_kernels, pie.engine.model), on any CPU."""

from __future__ import annotations

import os

import pytest
import torch

from pie.engine import cpu_kernels, model
from pie.engine.loader import load_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_page_zeros_is_zero_writable_and_aligned(dtype: torch.dtype) -> None:
    shape = (3, 2, 40, 16, 3, 64)  # a small KV cache: [layers, K/V, pages, slots, heads, dim]
    x = cpu_kernels.huge_page_zeros(shape, dtype)
    assert tuple(x.shape) == shape and x.dtype == dtype and x.is_contiguous()
    assert x.data_ptr() % (2 << 20) == 0
    assert not x.any()
    x[2, 1, 39, 15] = 1.5  # the very last row is ours to write
    x[0, 0, 0, 0, 0, 0] = -2.0
    assert x.float().sum().item() == 1.5 * 3 * 64 - 2.0


def test_huge_page_zeros_outlives_its_creator() -> None:
    views = [cpu_kernels.huge_page_zeros((1024,), torch.float32)[512:] for _ in range(3)]
    for i, v in enumerate(views):
        v.fill_(float(i))
    assert [v.sum().item() for v in views] == [0.0, 512.0, 1024.0]


def test_huge_page_zeros_of_nothing() -> None:
    assert cpu_kernels.huge_page_zeros((0, 4), torch.float32).shape == (0, 4)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux's /proc")
def test_release_free_heap_hands_freed_buffers_back() -> None:
    """What a load frees (the float32 copies of packed weights) leaves the process."""
    if not model.tune_cpu_allocator():  # keeps freed heap memory, as a loaded engine does
        pytest.skip("needs glibc (mallopt and malloc_trim)")
    assert model.release_free_heap()  # other tests' freed memory out of the way first
    before = _resident_bytes()
    buffers = [torch.ones(1 << 19) for _ in range(100)]  # 100 x 2 MiB, under the mmap threshold
    del buffers
    held = _resident_bytes()
    assert held - before > 100 << 20  # freed, but still the process's
    assert model.release_free_heap()
    assert _resident_bytes() < held - (100 << 20)


def test_a_pool_sized_to_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """`Engine.load(num_pages=None)`: 4 GiB or a quarter of the available memory on CPU."""
    from pie.engine import engine as engine_module
    from pie.engine.config import ModelConfig

    cfg = load_model().config
    assert isinstance(cfg, ModelConfig)
    per_page = cfg.num_layers * 2 * 16 * cfg.num_kv_heads * cfg.head_dim * 4  # float32
    cpu = torch.device("cpu")
    monkeypatch.setattr(engine_module, "available_memory", lambda: 64 * 2**30)
    assert engine_module.pages_for_memory(cfg, torch.float32, 16, cpu) == 4 * 2**30 // per_page
    monkeypatch.setattr(engine_module, "available_memory", lambda: 2 * 2**30)
    assert engine_module.pages_for_memory(cfg, torch.float32, 16, cpu) == 2**29 // per_page
    monkeypatch.setattr(engine_module, "available_memory", lambda: 2**20)
    assert engine_module.pages_for_memory(cfg, torch.float32, 16, cpu) == 64  # the floor
