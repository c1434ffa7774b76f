"""HNSW index shards held in Ray actors, one version beside the next.

A shard loads its part of a model version's index (`index/shard_NNN`), answers searches for a
named version, and keeps the previous version until the callers have switched, so a model swap
never mixes item numbering between versions.

A shard whose node is lost restarts elsewhere empty: the first search that finds its version
missing loads it again and replays the writes sent since (`RemoteIndex`), and until it is back
a search merges what the other shards answer (fewer embedding candidates, not a failed
request)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np
import ray

from deployments.runtime import actor_options, pin_threads
from rec.index import Index, load_index, merge_topk

KEEP_VERSIONS = 2
log = logging.getLogger("rec.shards")


class UnknownVersion(KeyError):
    """The shard never loaded this version (since it last started)."""


class EvictedVersion(KeyError):
    """The shard dropped this version for newer ones (KEEP_VERSIONS)."""


@ray.remote(max_restarts=-1)
class IndexShard:
    def __init__(self) -> None:
        pin_threads()
        self.versions: dict[str, Index] = {}
        self.evicted: set[str] = set()

    def load(self, version: str, path: str) -> int:
        if version not in self.versions:
            self.versions[version] = load_index(path)
            self.evicted.discard(version)
            for old in list(self.versions)[:-KEEP_VERSIONS]:
                del self.versions[old]
                self.evicted.add(old)
        return len(self.versions[version])

    def where(self) -> dict:
        """This shard's Ray node and the versions it holds, oldest first."""
        return {"node": ray.get_runtime_context().get_node_id(), "versions": list(self.versions)}

    def add(self, version: str, ids: np.ndarray, vectors: np.ndarray) -> None:
        if version in self.versions:
            self.versions[version].add(ids, vectors)

    def mark_deleted(self, version: str, ids: np.ndarray) -> None:
        if version in self.versions:
            self.versions[version].mark_deleted(ids)

    def search(
        self, version: str, query: np.ndarray, k: int, filter_ids: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        index = self.versions.get(version)
        if index is None:
            raise (EvictedVersion if version in self.evicted else UnknownVersion)(version)
        return index.search(query, k, filter_ids=filter_ids)


def shard_actors(n: int, num_cpus: float, resources: dict[str, float] | None = None) -> list:
    return [
        IndexShard.options(
            name=f"rec_index_shard_{i}",
            namespace="rec",
            get_if_exists=True,
            lifetime="detached",
            scheduling_strategy="SPREAD",  # one node's loss takes as few shards as it can
            enable_task_events=False,  # a search per request: not worth the GCS's memory
            **actor_options(num_cpus, resources=resources),
        ).remote()
        for i in range(n)
    ]


class RemoteIndex:
    """The Index a Recommender sees when its vectors live in shard actors: writes are sent
    (ordered, not awaited) and kept, to be replayed on a shard that restarted; searches go
    through `asearch`, fanned out and merged."""

    def __init__(self, shards: list, version: str, version_dir: Path) -> None:
        self.shards = shards
        self.version = version
        self.paths = [str(version_dir / "index" / f"shard_{i:03d}") for i in range(len(shards))]
        sizes = ray.get(
            [s.load.remote(version, p) for s, p in zip(shards, self.paths, strict=True)]
        )
        self.size = sum(sizes)
        self.dim = 0
        # per shard, the writes sent since the load, in order: ("add", ids, vectors) or
        # ("delete", ids); items added while serving, so bounded by the index headroom
        self.writes: list[list[tuple]] = [[] for _ in shards]
        self._reloading: dict[int, asyncio.Future] = {}
        self.reloads = 0

    def __len__(self) -> int:
        return self.size

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        n = len(self.shards)
        for s, shard in enumerate(self.shards):
            mine = ids % n == s
            if mine.any():
                self.writes[s].append(("add", ids[mine], vectors[mine]))
                shard.add.remote(self.version, ids[mine], vectors[mine])
        self.size += len(ids)

    def mark_deleted(self, ids: np.ndarray) -> None:
        for s, shard in enumerate(self.shards):
            self.writes[s].append(("delete", ids))
            shard.mark_deleted.remote(self.version, ids)

    def search(self, *_args, **_kwargs):
        raise RuntimeError("RemoteIndex is searched with `await asearch(...)`")

    async def asearch(
        self, query: np.ndarray, k: int, filter_ids: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        parts = await asyncio.gather(
            *[self._search(s, query, k, filter_ids) for s in range(len(self.shards))]
        )
        answered = [p for p in parts if p is not None]
        if not answered:
            raise RuntimeError(f"no index shard of {self.version} answered")
        ids, scores = merge_topk(answered, k)
        return ids[0], scores[0]

    async def _search(self, s: int, query, k, filter_ids) -> tuple | None:
        """Shard s's answer; None while it is unavailable (its node lost, restarting)."""
        shard = self.shards[s]
        try:
            try:
                return await shard.search.remote(self.version, query, k, filter_ids)
            except UnknownVersion:
                await self._reload(s)
                return await shard.search.remote(self.version, query, k, filter_ids)
        except (ray.exceptions.RayActorError, UnknownVersion) as exc:
            log.warning("index shard %d of %s unavailable: %r", s, self.version, exc)
            return None

    async def _reload(self, s: int) -> None:
        """Load this version into shard s again and replay the writes sent since; concurrent
        searches wait for the one reload."""
        pending = self._reloading.get(s)
        if pending is None:
            pending = self._reloading[s] = asyncio.ensure_future(self._reload_now(s))
            pending.add_done_callback(lambda _: self._reloading.pop(s, None))
        await asyncio.shield(pending)

    async def _reload_now(self, s: int) -> None:
        shard = self.shards[s]
        await shard.load.remote(self.version, self.paths[s])
        for write in list(self.writes[s]):
            if write[0] == "add":
                await shard.add.remote(self.version, write[1], write[2])
            else:
                await shard.mark_deleted.remote(self.version, write[1])
        self.reloads += 1
        log.warning(
            "index shard %d reloaded %s (%d writes replayed)", s, self.version, len(self.writes[s])
        )
