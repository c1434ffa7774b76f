"""Giving memory back to the OS after a large transient job (a log snapshot, a segment rewrite,
a model swap): without it the process keeps its peak, which a long run reads as growth."""

from __future__ import annotations

import ctypes
import ctypes.util

import pyarrow as pa

_libc = None
_mallctl = None
# jemalloc's "every arena" index (MALLCTL_ARENAS_ALL)
_PURGE_ALL = b"arena.4096.purge"


def release_memory() -> None:
    """Return freed memory to the OS: Arrow's pool drops its cached blocks, and the process's
    malloc gives back its free pages (Arrow's per-batch bookkeeping and Python's large objects
    come from malloc, whose freed pages otherwise stay resident): jemalloc's arenas are purged
    where it is the allocator (`deployments.runtime.allocator_env`), glibc's heap is trimmed
    otherwise. A no-op where there is neither."""
    global _libc, _mallctl
    pa.default_memory_pool().release_unused()
    if _libc is None:
        process = ctypes.CDLL(None)  # the symbols the process resolves: a preloaded malloc's
        _mallctl = getattr(process, "mallctl", False)
        name = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(name) if name else False
    if _mallctl:
        _mallctl(_PURGE_ALL, None, None, None, ctypes.c_size_t(0))
    elif _libc and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)
