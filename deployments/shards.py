"""HNSW index shards held in Ray actors, one version beside the next.

A shard loads its part of a model version's index (`index/shard_NNN`), answers searches for a
named version, and keeps the previous version until the callers have switched, so a model swap
never mixes item numbering between versions."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import ray

from deployments.runtime import actor_options, pin_threads
from rec.index import Index, load_index, merge_topk

KEEP_VERSIONS = 2


@ray.remote(max_restarts=-1)
class IndexShard:
    def __init__(self) -> None:
        pin_threads()
        self.versions: dict[str, Index] = {}

    def load(self, version: str, path: str) -> int:
        if version not in self.versions:
            self.versions[version] = load_index(path)
            for old in list(self.versions)[:-KEEP_VERSIONS]:
                del self.versions[old]
        return len(self.versions[version])

    def add(self, version: str, ids: np.ndarray, vectors: np.ndarray) -> None:
        if version in self.versions:
            self.versions[version].add(ids, vectors)

    def mark_deleted(self, version: str, ids: np.ndarray) -> None:
        if version in self.versions:
            self.versions[version].mark_deleted(ids)

    def search(
        self, version: str, query: np.ndarray, k: int, filter_ids: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        return self.versions[version].search(query, k, filter_ids=filter_ids)


def shard_actors(n: int, num_cpus: float) -> list:
    return [
        IndexShard.options(
            name=f"rec_index_shard_{i}",
            namespace="rec",
            get_if_exists=True,
            lifetime="detached",
            **actor_options(num_cpus),
        ).remote()
        for i in range(n)
    ]


class RemoteIndex:
    """The Index a Recommender sees when its vectors live in shard actors: writes are sent
    (ordered, not awaited); searches go through `asearch`, fanned out and merged."""

    def __init__(self, shards: list, version: str, version_dir: Path) -> None:
        self.shards = shards
        self.version = version
        sizes = ray.get(
            [
                s.load.remote(version, str(version_dir / "index" / f"shard_{i:03d}"))
                for i, s in enumerate(shards)
            ]
        )
        self.size = sum(sizes)
        self.dim = 0

    def __len__(self) -> int:
        return self.size

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        n = len(self.shards)
        for s, shard in enumerate(self.shards):
            mine = ids % n == s
            if mine.any():
                shard.add.remote(self.version, ids[mine], vectors[mine])
        self.size += len(ids)

    def mark_deleted(self, ids: np.ndarray) -> None:
        for shard in self.shards:
            shard.mark_deleted.remote(self.version, ids)

    def search(self, *_args, **_kwargs):
        raise RuntimeError("RemoteIndex is searched with `await asearch(...)`")

    async def asearch(
        self, query: np.ndarray, k: int, filter_ids: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        parts = await asyncio.gather(
            *[s.search.remote(self.version, query, k, filter_ids) for s in self.shards]
        )
        ids, scores = merge_topk(list(parts), k)
        return ids[0], scores[0]
