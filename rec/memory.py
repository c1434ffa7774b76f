"""Giving memory back to the OS after a large transient job (a log snapshot, a segment rewrite,
a model swap): without it the process keeps its peak, which a long run reads as growth."""

from __future__ import annotations

import ctypes
import ctypes.util

import pyarrow as pa

_libc = None


def release_memory() -> None:
    """Return freed memory to the OS: Arrow's pool drops its cached blocks, and glibc's heap
    is trimmed (Arrow's per-batch bookkeeping and Python's large objects come from malloc,
    whose freed pages otherwise stay resident). A no-op where there is no glibc."""
    global _libc
    pa.default_memory_pool().release_unused()
    if _libc is None:
        name = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(name) if name else False
    if _libc and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)
