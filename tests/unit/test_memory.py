"""rec's processes run on jemalloc (deployments.runtime.allocator_env), and release_memory gives
a freed transient state's pages back to the OS under it and under glibc's malloc."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from deployments.runtime import actor_options, allocator_env

# Builds and frees ~200 MB of malloc-sized objects (above pymalloc's 512 B), then prints RSS in
# MB: built, freed, released, and whether jemalloc is the allocator.
PROBE = """
import psutil
from rec import memory
rss = lambda: psutil.Process().memory_info().rss / 2**20
rows = [bytearray(2048) for _ in range(100_000)]
built = rss()
del rows
freed = rss()
memory.release_memory()
print(built, freed, rss(), bool(memory._mallctl))
"""


def _probe(env: dict[str, str]) -> tuple[float, float, float, bool]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return float(out[0]), float(out[1]), float(out[2]), out[3] == "True"


@pytest.mark.skipif(not allocator_env(), reason="Ray ships no jemalloc here")
def test_actors_preload_jemalloc_and_release_memory_purges_it() -> None:
    env = allocator_env()
    assert os.path.exists(env["LD_PRELOAD"])
    assert actor_options(1)["runtime_env"]["env_vars"]["LD_PRELOAD"] == env["LD_PRELOAD"]
    # freed pages never decay here: only release_memory's purge can give them back
    conf = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
    built, freed, released, jemalloc = _probe({**env, "MALLOC_CONF": conf})
    assert jemalloc
    assert freed > built - 50 and released < built - 150


def test_release_memory_trims_glibc_without_jemalloc(monkeypatch) -> None:
    monkeypatch.setenv("REC_ALLOCATOR", "system")
    assert allocator_env() == {}
    assert "LD_PRELOAD" not in actor_options(1)["runtime_env"]["env_vars"]
    built, _, released, jemalloc = _probe({"LD_PRELOAD": ""})
    assert not jemalloc
    assert released < built - 150
