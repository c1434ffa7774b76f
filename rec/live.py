"""A replica's live view of the system: its part of a `rec.pipeline.Recommender` (the whole
pipeline, profiles only or recall only: `PARTS`) kept up to date with the event log (followed by
offset) and, where the part holds models, with the newest published version (hot reload).

Read-your-writes: before serving a request, a strict replica makes sure it has applied every
record committed before the request arrived that concerns the request's user or the catalogue.
On the log's machine it reads the log's head offset, whom the newest records concern and the
records themselves from shared memory (`rec.beacon`), and calls the log actor only when
those cannot serve it (another machine, a replica far behind); concurrent requests share one
log read, so the cost there is one actor call per burst.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from pathlib import Path

from rec import checkpoint
from rec.beacon import HeadReader
from rec.config import RecConfig
from rec.index import Index
from rec.memory import release_memory
from rec.model import ModelBundle, current_version, load_saved_index
from rec.pipeline import Recommender

log = logging.getLogger("rec.live")
READ_LIMIT = 20_000
APPLY_SLICE = 250  # log records applied to a warming model version between yields to requests
# What a replica holds of the pipeline: everything (fused), profiles only (the profile stage,
# which no model version touches) or the catalogue, item counts and models (the recall stage).
PARTS = {
    "all": {"profiles": True, "recall": True},
    "profiles": {"profiles": True, "recall": False},
    "recall": {"profiles": False, "recall": True},
}


MAX_SYNC_FAILURES = 3  # background catch-ups failing in a row before the replica reports it


class Live:
    def __init__(self, config: RecConfig, log_actor, index_factory=None, part: str = "all") -> None:
        self.config = config
        self.log = log_actor
        self.parts = PARTS[part]
        self.rec = Recommender(config, **self.parts)
        self.index_factory = index_factory  # version dir -> Index; None: load the saved index
        self._lock = asyncio.Lock()
        self._synced_at = 0.0  # perf_counter when the newest completed sync started
        self._reloader: asyncio.Task | None = None
        self._catching_up: asyncio.Task | None = None
        self._head: HeadReader | None = None
        self.reloads = 0
        self._started = False  # swaps share the serving state's profiles once it has synced
        self.sync_failures = 0  # background catch-ups failed in a row

    async def start(self) -> None:
        """Load the published model (if any) and the newest usable checkpoint, catch up with
        the log from there, start watching for models."""
        await self._open_head()
        if not await self.reload_if_changed():  # no model (or a part that holds none)
            self.rec = await asyncio.to_thread(self._fresh, None, None)
        await self.sync()
        self._started = True
        gc.collect()
        gc.freeze()
        self._reloader = asyncio.get_running_loop().create_task(self._watch())

    async def sync(self, max_staleness_s: float = 0.0, user: str | None = None) -> None:
        """Apply every record committed before this call (or before max_staleness_s ago). For
        a request of `user`, only the unapplied records that concern that user or everyone
        (catalogue changes) make it wait; other users' events are applied by a catch-up in the
        background, so one user's click does not stall every request on the other replicas."""
        arrived = time.perf_counter()
        if self._synced_at >= arrived - max_staleness_s:
            return
        head = self._head.head() if self._head is not None else None
        if head is not None and head <= self.rec.offset:
            return  # the log holds nothing this replica has not applied
        if (
            user is not None
            and head is not None
            and not self._head.concerns(user, self.rec.offset, head)
        ):
            self._catch_up()
            return
        async with self._lock:
            if self._synced_at >= arrived - max_staleness_s:
                return  # a sync that started after we arrived has finished meanwhile
            started = time.perf_counter()
            async for records in self._pages(self.rec.offset):
                self.rec.apply(records)
            self._synced_at = started
        if self._head is not None and head is None:
            await self._open_head()  # the log actor restarted: find its file again

    def _catch_up(self) -> None:
        """Apply what the log holds, in the background (one catch-up at a time)."""
        if self._catching_up is None or self._catching_up.done():
            self._catching_up = asyncio.get_running_loop().create_task(self._catch_up_now())

    async def _catch_up_now(self) -> None:
        try:
            await self.sync()
            self.sync_failures = 0
        except Exception:  # the next request's own sync tries again
            self.sync_failures += 1
            log.exception("background catch-up with the log failed")

    def problem(self) -> str | None:
        """Why this replica cannot follow the log or models (None: healthy), for Serve's
        health check, which replaces a replica that keeps failing it."""
        watcher = self._reloader
        if watcher is not None and watcher.done():
            return "the model watcher stopped"
        if self.sync_failures >= MAX_SYNC_FAILURES:
            return f"{self.sync_failures} catch-ups with the log failed in a row"
        return None

    def apply_own(self, records: list[dict], first: int) -> bool:
        """Apply records this replica has just appended (acknowledged, so committed at offsets
        first, first + 1, ...) without reading them back, when every record before them is
        applied here already; False when some are missing (the next sync reads them all). A
        follower reading the log gets the same dicts with their offsets, so both paths apply
        the same state, and `Recommender.apply` skips whatever offset it has already applied."""
        if self.rec.offset != first:
            return False
        self.rec.apply([{**r, "offset": first + i} for i, r in enumerate(records)])
        return True

    async def _open_head(self) -> None:
        self._head = HeadReader.open(await self.log.head_info.remote())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.config.serving.reload_poll_s)
            try:
                await self.reload_if_changed()
            except Exception:  # a bad version must not take the replica down
                log.exception("model reload failed; still serving %s", self.rec.version)

    async def reload_if_changed(self) -> bool:
        if not self.parts["recall"]:
            return False  # profiles do not depend on a model version
        version = current_version(self.config.model_dir)
        if version is None or version == self.rec.version:
            return False
        path = Path(self.config.model_dir) / version
        model, index = await asyncio.to_thread(self._load, path)
        # The new version's state is built beside the one serving: its catalogue and counts as
        # a fresh replica would build them, from the newest checkpoint it can use and the log
        # after it applied in slices, yielding to requests between them, and only the records
        # that arrived meanwhile applied under the lock before the switch. Its profiles are the
        # serving state's own, which depend on no version: rebuilding them cost a second copy
        # of every user active since the checkpoint at each swap, and the churn of freeing the
        # first (once the replica has started; at start-up they come from the checkpoint).
        share = self._started and self.parts["profiles"]
        fresh = await asyncio.to_thread(self._fresh, model, index, not share)
        if share:
            await self.sync()  # the profiles must be at or past the checkpoint's offset
            fresh.state.share_profiles(self.rec.state)
        async for records in self._pages(fresh.offset):
            for i in range(0, len(records), APPLY_SLICE):
                fresh.apply(records[i : i + APPLY_SLICE])
                await asyncio.sleep(0)
        async with self._lock:
            async for records in self._pages(fresh.offset):
                fresh.apply(records)
            self.rec = fresh
        # The model and the replayed state are ~250k tracked objects on the default data, and
        # a full collection walks them all (175 ms in process) while the replica serves
        # nothing: they are long-lived, so they move out of the collector's sight (Serve's
        # throughput mode froze only what existed at start-up, before any model loaded). The
        # old version is freed by reference counting (it holds no reference cycle: a frozen
        # cycle is never collected), and its pages go back to the OS. One full collection
        # first: the cyclic garbage requests left since the last one would be frozen too, and
        # never freed.
        gc.collect()
        gc.freeze()
        await asyncio.to_thread(release_memory)
        self.reloads += 1
        log.info("now serving model %s", version)
        return True

    def _fresh(
        self, model: ModelBundle | None, index: Index | None, profiles: bool = True
    ) -> Recommender:
        """A Recommender of this replica's part for `model`, its state from a checkpoint
        (without profiles when profiles=False: the caller shares the serving state's)."""
        parts = self.parts
        basis = model.basis if model is not None else None
        state = checkpoint.start_state(
            self.config, basis, profiles and parts["profiles"], parts["recall"]
        )
        return Recommender(self.config, model, index, **parts, state=state)

    def _load(self, path: Path) -> tuple[ModelBundle, Index | None]:
        model = ModelBundle.load(path, device=self.config.ranker.device)
        if self.index_factory is not None:
            return model, self.index_factory(path)
        return model, load_saved_index(path)

    async def _pages(self, start: int):
        """Committed records from `start` on, in pages of at most READ_LIMIT: from the log's
        shared records ring when it holds them all (this machine, recent), else from the log."""
        head = self._head.head() if self._head is not None else None
        if head is not None and head - start <= READ_LIMIT:
            records = self._head.recent(start, head)
            if records is not None:
                if records:
                    yield records
                return
        while True:
            records = await self.log.read.remote(start, READ_LIMIT)
            if records:
                yield records
            if len(records) < READ_LIMIT:
                return
            start = records[-1]["offset"] + 1

    def stop(self) -> None:
        for task in (self._reloader, self._catching_up):
            if task is not None:
                task.cancel()
