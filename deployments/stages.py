"""The pipeline's stages as Serve deployments (split topology) and the one-process equivalent
(fused topology). Both answer the same async calls (`LocalStages`, `RemoteStages`), so the
ingress does not care which it has.

In the split topology each deployment holds only its stage's state: the Profile deployment the
profiles, the Recall deployment the catalogue, item counts, recall models and index (or the
handles of the index shard actors), the Ranker deployment only ranking networks. A request's
model version is the one its recall replica served it with; it travels with the candidates, and
the ranker scores them with that version's network, whichever it has loaded since.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np
from ray import serve
from ray.serve.exceptions import RayServeException

from deployments import telemetry
from deployments.eventlog import from_node
from deployments.runtime import Startup, pin_threads
from deployments.shards import RemoteIndex, shard_actors
from rec.config import RecConfig
from rec.features import RankInputs, rank_probabilities
from rec.filters import NO_FILTERS, Filters
from rec.live import Live
from rec.model import current_version
from rec.pipeline import Recalled, Recommender
from rec.profile import ProfileView
from rec.ranker import Ranker

log = logging.getLogger("rec.stages")
RANKER_VERSIONS_KEPT = 3  # a request of an older version than these reloads its network


def make_live(config: RecConfig, log, part: str = "all") -> Live:
    """A replica's live state, following `log` from this replica's Ray node (`from_node`)."""
    factory = None
    s = config.serving
    if s.ann_shards > 0 and part != "profiles":
        shards = shard_actors(s.ann_shards, s.replica_cpus / 2, s.replica_resources)

        def factory(path):
            return RemoteIndex(shards, path.name, path)

    return Live(config, from_node(log), index_factory=factory, part=part)


async def recall_with_index(
    rec: Recommender, view: ProfileView, context: dict | None, rank: bool, filters: Filters
) -> Recalled:
    """Recall (and rank=True: rank) with one version's `rec`; the embedding search goes to the
    shard actors when the index lives there."""
    index = rec.index
    if isinstance(index, RemoteIndex) and len(index):
        vec = rec.recaller.user_vector(view)
        if vec is not None:
            n = rec.config.recall.per_source
            ann = await index.asearch(vec, n, rec.recaller.ann_filter(view, filters))
            return rec.recalled(view, context, ann=ann, rank=rank, filters=filters)
    return rec.recalled(view, context, rank=rank, filters=filters)


def model_info(rec: Recommender, reloads: int) -> dict:
    model = rec.model
    return {
        "serving": rec.version,
        "reloads": reloads,
        "started_from": rec.state.checkpoint,  # the checkpoint the served state was built on
        "metrics": model.metrics if model else None,
    }


class LocalStages:
    """Every stage in this process (fused topology), sharing one live state. A request runs
    its stages back to back with one version's pipeline (awaiting only a log read or a remote
    index): replicas run user code on a thread of its own (`runtime.ENV`), so Serve's loop
    admits and rejects requests meanwhile, and requests in a replica finish in arrival order
    instead of sharing the thread stage by stage."""

    def __init__(self, live: Live) -> None:
        self.live = live

    async def view(self, user_id: str) -> ProfileView:
        await self.live.sync(user=user_id)
        return self.live.rec.view(user_id)

    async def recall(self, view: ProfileView, context: dict | None, filters: Filters) -> Recalled:
        return await recall_with_index(self.live.rec, view, context, True, filters)

    async def rank(self, recalled: Recalled) -> np.ndarray:
        return recalled.scores

    async def similar(self, item_id: str, k: int) -> dict | None:
        await self.live.sync(0.05)
        return similar_answer(self.live.rec, item_id, k)

    async def item(self, item_id: str) -> dict | None:
        await self.live.sync()
        return self.live.rec.item_info(item_id)

    async def unknown_items(self, item_ids: list[str]) -> list[str]:
        await self.live.sync()
        return sorted(set(item_ids) - set(self.live.rec.catalog.index))

    async def unknown_categories(self, names: set[str]) -> list[str]:
        await self.live.sync()
        return sorted(names - self.live.rec.catalog.category_names())

    async def model_info(self) -> dict:
        return model_info(self.live.rec, self.live.reloads)

    def applied(self, records: list[dict], first: int) -> None:
        """Records this replica appended: its next request finds them applied without reading
        the log (`Live.apply_own`)."""
        self.live.apply_own(records, first)


class RemoteStages:
    """The same calls, answered by the Profile, Recall and Ranker deployments."""

    def __init__(self, profile, recall, ranker) -> None:
        self.profile, self.recall_h, self.ranker = profile, recall, ranker

    async def view(self, user_id: str) -> ProfileView:
        return await self.profile.view.remote(user_id)

    async def recall(self, view: ProfileView, context: dict | None, filters: Filters) -> Recalled:
        return await self.recall_h.recall.remote(view, context, filters)

    async def rank(self, recalled: Recalled) -> np.ndarray:
        if recalled.scores is not None:  # a recall order is served: no ranker hop
            return recalled.scores
        return await self.ranker.rank.remote(recalled.version, recalled.inputs)

    async def similar(self, item_id: str, k: int) -> dict | None:
        return await self.recall_h.similar.remote(item_id, k)

    async def item(self, item_id: str) -> dict | None:
        return await self.recall_h.item.remote(item_id)

    async def unknown_items(self, item_ids: list[str]) -> list[str]:
        return await self.recall_h.unknown_items.remote(item_ids)

    async def unknown_categories(self, names: set[str]) -> list[str]:
        return await self.recall_h.unknown_categories.remote(names)

    async def model_info(self) -> dict:
        return await self.recall_h.model_info.remote()

    def applied(self, records: list[dict], first: int) -> None:
        """The stages follow the log themselves."""


def similar_answer(rec: Recommender, item_id: str, k: int) -> dict | None:
    items = rec.similar(item_id, k)
    if items is None:
        return None
    return {"item_id": item_id, "items": items, "model_version": rec.version}


class _Following:
    """A deployment following the log with its part of the pipeline."""

    part = "all"

    def __init__(self, config: dict, log) -> None:
        pin_threads()
        self.config = RecConfig.model_validate(config)
        self.live = make_live(self.config, log, self.part)
        self._started = Startup(self.live.start())

    def check_health(self) -> None:
        """Serve's health check: a replica that cannot follow the log or models fails it."""
        problem = self.live.problem()
        if problem is not None:
            raise RuntimeError(problem)


@serve.deployment
class ProfileStage(_Following):
    """Profiles only: no model, no catalogue beyond the item metadata interest tags read."""

    part = "profiles"

    async def view(self, user_id: str) -> ProfileView:
        await self._started.wait()
        await self.live.sync(user=user_id)  # read-your-writes: never stale for this user
        telemetry.serving().applied.set(self.live.rec.offset, tags={"part": self.part})
        return self.live.rec.view(user_id)


@serve.deployment
class RecallStage(_Following):
    """The catalogue, item counts, recall models and index; builds the ranker's features."""

    part = "recall"

    async def recall(
        self, view: ProfileView, context: dict | None, filters: Filters = NO_FILTERS
    ) -> Recalled:
        await self._started.wait()
        # the user's own records (item-CF's partners) and catalogue changes, never stale
        await self.live.sync(user=view.user_id)
        metrics = telemetry.serving()
        metrics.applied.set(self.live.rec.offset, tags={"part": self.part})
        metrics.serving(self.live.rec.version)
        return await recall_with_index(self.live.rec, view, context, False, filters)

    async def similar(self, item_id: str, k: int) -> dict | None:
        await self._started.wait()
        await self.live.sync(0.05)
        return similar_answer(self.live.rec, item_id, k)

    async def item(self, item_id: str) -> dict | None:
        await self._started.wait()
        await self.live.sync()
        return self.live.rec.item_info(item_id)

    async def unknown_items(self, item_ids: list[str]) -> list[str]:
        await self._started.wait()
        await self.live.sync()
        return sorted(set(item_ids) - set(self.live.rec.catalog.index))

    async def unknown_categories(self, names: set[str]) -> list[str]:
        await self._started.wait()
        await self.live.sync()
        return sorted(names - self.live.rec.catalog.category_names())

    async def model_info(self) -> dict:
        if not self._started.done():  # /readyz answers "loading" now, not after the replay
            return {"serving": None, "loading": True}
        await self._started.wait()  # raises what the start-up raised
        return model_info(self.live.rec, self.live.reloads)


@serve.deployment
class RankerStage:
    """Only ranking networks, by model version: it reads neither the log nor the catalogue.
    Requests arriving together are scored as one batch, each with its own version's network;
    the newest RANKER_VERSIONS_KEPT stay loaded (the published one is loaded ahead)."""

    def __init__(self, config: dict) -> None:
        pin_threads()
        self.config = RecConfig.model_validate(config)
        self.rankers: OrderedDict[str, Ranker] = OrderedDict()
        try:  # Serve's local testing mode has no replica context, and so no @serve.batch
            serve.get_replica_context()
            self.batching = True
        except RayServeException:
            self.batching = False
        self._watcher = asyncio.get_event_loop().create_task(self._watch())

    async def rank(self, version: str, inputs: RankInputs) -> np.ndarray:
        if not self.batching:
            return self.score([(version, inputs)])[0]
        return await self._batched((version, inputs))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _batched(self, requests: list[tuple[str, RankInputs]]) -> list[np.ndarray]:
        return self.score(requests)

    def score(self, requests: list[tuple[str, RankInputs]]) -> list[np.ndarray]:
        """Each request's probabilities, one model call per version in the batch."""
        out: list[np.ndarray | None] = [None] * len(requests)
        by_version: dict[str, list[int]] = {}
        for n, (version, _) in enumerate(requests):
            by_version.setdefault(version, []).append(n)
        for version, rows in by_version.items():
            probs = rank_probabilities(self.ranker(version), [requests[n][1] for n in rows])
            for n, p in zip(rows, probs, strict=True):
                out[n] = p
        return out

    def ranker(self, version: str) -> Ranker:
        ranker = self.rankers.get(version)
        return ranker if ranker is not None else self._keep(version, self._load(version))

    def _load(self, version: str) -> Ranker:
        path = Path(self.config.model_dir) / version / "ranker"
        return Ranker.load(path, device=self.config.ranker.device)

    def _keep(self, version: str, ranker: Ranker) -> Ranker:
        self.rankers[version] = ranker
        while len(self.rankers) > RANKER_VERSIONS_KEPT:
            self.rankers.popitem(last=False)
        return ranker

    @property
    def versions(self) -> list[str]:
        return list(self.rankers)

    async def _watch(self) -> None:
        """Load each newly published version's network before its first request needs it."""
        while True:
            try:
                version = current_version(self.config.model_dir)
                path = Path(self.config.model_dir) / f"{version}" / "ranker"
                if version is not None and version not in self.rankers and path.exists():
                    self._keep(version, await asyncio.to_thread(self._load, version))
            except Exception:  # a bad version must not take the replica down
                log.exception("loading a published ranker failed")
            await asyncio.sleep(self.config.serving.reload_poll_s)
