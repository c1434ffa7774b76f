"""The pipeline stages as Serve deployments (split topology) and the one-process equivalent
(fused topology). Both expose the same async calls, so the ingress does not care which it has.
"""

from __future__ import annotations

import asyncio

import numpy as np
from ray import serve
from ray.serve.exceptions import RayServeException

from deployments.live import Live
from deployments.runtime import pin_threads
from deployments.shards import RemoteIndex, shard_actors
from rec.config import RecConfig
from rec.profile import ProfileView
from rec.recall.stage import CandidateSet

STAGE_STALENESS_S = 0.05  # recall/rank replicas may lag the log this much (profiles never do)


def make_live(config: RecConfig, log) -> Live:
    factory = None
    if config.serving.ann_shards > 0:
        shards = shard_actors(config.serving.ann_shards, config.serving.replica_cpus / 2)

        def factory(path):
            return RemoteIndex(shards, path.name, path)

    return Live(config, log, index_factory=factory)


async def recall_with_index(live: Live, view: ProfileView) -> CandidateSet:
    """Recall; the embedding search goes to the shard actors when the index lives there."""
    rec = live.rec
    index = rec.index
    if isinstance(index, RemoteIndex) and view.vec is not None and len(index):
        ann = await index.asearch(view.vec, live.config.recall.per_source, rec.ann_filter(view))
        return rec.recall(view, ann=ann)
    return rec.recall(view)


class LocalStages:
    """Every stage in this process (fused topology), sharing one live state. A request runs
    its stages back to back (awaiting only a log read or a remote index): replicas run user
    code on a thread of its own (`runtime.ENV`), so Serve's loop admits and rejects requests
    meanwhile, and requests in a replica finish in arrival order instead of sharing the
    thread stage by stage."""

    def __init__(self, live: Live) -> None:
        self.live = live

    async def view(self, user_id: str) -> ProfileView:
        await self.live.sync(user=user_id)
        return self.live.rec.view(user_id)

    async def recall(self, view: ProfileView) -> CandidateSet:
        return await recall_with_index(self.live, view)

    async def rank(
        self, view: ProfileView, cands: CandidateSet, context: dict | None
    ) -> np.ndarray:
        return self.live.rec.rank(view, cands, context)


class RemoteStages:
    """The same calls, answered by the Profile, Recall and Ranker deployments."""

    def __init__(self, profile, recall, ranker) -> None:
        self.profile, self.recall_h, self.ranker = profile, recall, ranker

    async def view(self, user_id: str) -> ProfileView:
        return await self.profile.view.remote(user_id)

    async def recall(self, view: ProfileView) -> CandidateSet:
        return await self.recall_h.recall.remote(view)

    async def rank(
        self, view: ProfileView, cands: CandidateSet, context: dict | None
    ) -> np.ndarray:
        return await self.ranker.rank.remote(view, cands, context)


class _Stage:
    def __init__(self, config: dict, log) -> None:
        pin_threads()
        self.config = RecConfig.model_validate(config)
        self.live = make_live(self.config, log)
        self._started = asyncio.get_event_loop().create_task(self.live.start())


@serve.deployment
class ProfileStage(_Stage):
    async def view(self, user_id: str) -> ProfileView:
        await self._started
        await self.live.sync(user=user_id)  # read-your-writes: never stale for this user
        return self.live.rec.view(user_id)


@serve.deployment
class RecallStage(_Stage):
    async def recall(self, view: ProfileView) -> CandidateSet:
        await self._started
        await self.live.sync(STAGE_STALENESS_S)
        return await recall_with_index(self.live, view)


@serve.deployment
class RankerStage(_Stage):
    """Scores candidates; requests arriving together are scored as one batch."""

    def __init__(self, config: dict, log) -> None:
        super().__init__(config, log)
        try:  # Serve's local testing mode has no replica context, and so no @serve.batch
            serve.get_replica_context()
            self.batching = True
        except RayServeException:
            self.batching = False

    async def rank(
        self, view: ProfileView, cands: CandidateSet, context: dict | None
    ) -> np.ndarray:
        await self._started
        await self.live.sync(STAGE_STALENESS_S)
        if not self.batching:
            return self.live.rec.rank(view, cands, context)
        return await self._batched((view, cands, context))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _batched(self, requests: list[tuple]) -> list[np.ndarray]:
        return self.live.rec.rank_many(requests)
