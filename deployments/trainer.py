"""Retraining: a snapshot of the log, a Ray Train `TorchTrainer` job running the pure training
code of `rec.train`, and the new version published for every replica to hot-reload."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from pathlib import Path

import ray

from deployments import telemetry
from deployments.eventlog import get_log
from deployments.runtime import ON_HEAD, BackgroundStarts, actor_options, lower_own_priority
from rec import checkpoint
from rec.config import RecConfig
from rec.memory import release_memory
from rec.model import collect_versions, current_version, load_basis, new_version_name, publish

TRAINER_ACTOR = "rec_trainer"
# Log records per read while a checkpoint catches up. Two pages are alive at once (one being
# applied, the next travelling), as Python dicts of ~1 KB a record: the job's peak, which the
# trainer's memory keeps as its high-water.
READ_PAGE = 5_000
FIRST_MODEL_POLL_S = 10.0  # how often a trainer with no published model checks the log
log_ = logging.getLogger("rec.trainer")


def _train_worker(loop_config: dict) -> None:
    """Runs inside each Ray Train worker: fit everything, rank 0 saves the version."""
    lower_own_priority()  # first: the imports below take seconds of CPU
    import pyarrow.parquet as pq
    import ray.train
    import torch

    from rec.train import train

    config = RecConfig.model_validate(loop_config["config"])
    torch.set_num_threads(config.train.worker_threads)
    ctx = ray.train.get_context()

    def fit_ranker(ranker, ex):
        prepare = ray.train.torch.prepare_model if ctx.get_world_size() > 1 else None
        return ranker.fit(
            ex.item_idx,
            ex.user_vec,
            ex.item_vec,
            ex.dense,
            ex.labels,
            group_size=ex.group_size,
            prepare_model=prepare,
        )

    table = pq.read_table(loop_config["snapshot"])
    bundle = train(
        table,
        config,
        log_offset=loop_config["offset"],
        fit_ranker=fit_ranker,
        version=loop_config["version"],
        threads=config.train.worker_threads,
    )
    if ctx.get_world_rank() == 0:
        index = bundle.build_index(config.recall, shards=max(config.serving.ann_shards, 1))
        bundle.save(config.model_dir, index)
    ray.train.report({"version": loop_config["version"], **_flat(bundle.metrics)})


def _flat(metrics: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}_"))
        elif isinstance(value, int | float):
            out[f"{prefix}{key}"] = value
    return out


def run_train_job(config: RecConfig, snapshot: str, offset: int, version: str) -> None:
    lower_own_priority()  # this thread drives the job while serving runs (niceness is per thread)
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    tc = config.train
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "snapshot": snapshot,
            "offset": offset,
            "version": version,
        },
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers,
            use_gpu=tc.use_gpu,
            resources_per_worker={"CPU": tc.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=version, storage_path=str((Path(config.data_dir) / "ray_train").resolve())
        ),
    )
    trainer.fit()


@ray.remote(max_restarts=-1)
class Trainer:
    """Owns retraining and checkpoints of the live state: one job of each at a time, each on
    an optional periodic schedule."""

    def __init__(self, config: dict) -> None:
        self.config = RecConfig.model_validate(config)
        self.lock = asyncio.Lock()
        self.checkpoint_lock = asyncio.Lock()
        self.last: dict | None = None
        self.last_checkpoint: dict | None = None
        self.last_expiry: dict | None = None
        self.metrics = telemetry.training()
        self._published = current_version(self.config.model_dir)
        if self._published is not None:
            self.metrics.published.set(1, tags={"version": self._published})
        self.cleaned = clean_after_crash(self.config)
        if self.cleaned:
            log_.warning("removed what an interrupted run left: %s", self.cleaned)
        # The schedules belong to the actor, not to whoever created it: a restarted trainer
        # (its process killed, its node lost) resumes them. Ray runs an async actor's __init__
        # on its event loop; a test that builds the class by hand has none and drives it.
        self.schedules: list[asyncio.Task] = []
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        t, c = self.config.train, self.config.checkpoint
        self.schedules.append(loop.create_task(self.first_model()))
        if t.every_s:
            self.schedules.append(loop.create_task(self.run_every(t.every_s)))
        if c.every_s:
            self.schedules.append(loop.create_task(self.run_checkpoints(c.every_s, c.min_records)))

    async def checkpoint(
        self, upto: int | None = None, min_records: int = 0, version: str | None = None
    ) -> dict:
        """Checkpoint the live state at log offset `upto` (None: the log's head) for `version`
        (None: the published one), as a replica would hold it: from the newest usable
        checkpoint, the records after it applied. Skipped when the newest is fewer than
        min_records behind."""
        async with self.checkpoint_lock:
            t0 = time.perf_counter()
            config = self.config
            log = get_log()
            target = upto if upto is not None else await log.next_offset.remote()
            version = version or current_version(config.model_dir)
            basis = load_basis(config.model_dir / version) if version else None
            state = await asyncio.to_thread(checkpoint.start_state, config, basis)
            start = state.offset
            if target - start < max(min_records, 1):
                return {"checkpoint": None, "why": f"{target - start} records since the last"}
            pending = asyncio.ensure_future(log.read.remote(start, min(READ_PAGE, target - start)))
            while pending is not None:
                records = await pending
                nxt = records[-1]["offset"] + 1 if records else target
                pending = None
                if records and nxt < target:  # the next page travels while this one applies
                    pending = asyncio.ensure_future(
                        log.read.remote(nxt, min(READ_PAGE, target - nxt))
                    )
                await asyncio.to_thread(_apply_low, state, records)
            path = await asyncio.to_thread(_save_low, state, config)
            offset = state.offset
            del state, records  # the state is a replica's worth of memory: give it back
            await asyncio.to_thread(release_memory)
            await self._expire(log)
            self.last_checkpoint = {
                "checkpoint": path.name,
                "offset": offset,
                "applied": offset - start,
                "seconds": round(time.perf_counter() - t0, 2),
            }
            log_.info("checkpoint %s", self.last_checkpoint)
            return self.last_checkpoint

    async def _expire(self, log) -> None:
        """The log's retention policy, applied after each checkpoint below the oldest kept
        (what no state will start before again); a failure is logged, the next one retries."""
        e = self.config.eventlog
        protect = checkpoint.oldest_offset(self.config.checkpoint_dir)
        if protect is None or (e.retention_max_age_s is None and e.retention_max_bytes is None):
            return
        try:
            self.last_expiry = await log.expire.remote(protect)
        except Exception:
            log_.exception("applying the log's retention policy failed")
            return
        if self.last_expiry["expired_records"]:
            log_.info("retention: %s", self.last_expiry)

    async def run_checkpoints(self, interval_s: float, min_records: int) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.checkpoint(min_records=min_records)
            except Exception:  # logged; the next interval tries again
                log_.exception("periodic checkpoint failed")

    async def retrain(self) -> dict:
        async with self.lock:
            t0 = time.perf_counter()
            log = get_log()
            snap_dir = Path(self.config.data_dir) / "snapshots"
            snapshot, offset = await log.snapshot.remote(str(snap_dir))
            if offset < self.config.train.min_events:
                Path(snapshot).unlink(missing_ok=True)
                self.metrics.runs.inc(tags={"result": "skipped"})
                return {"published": None, "why": f"only {offset} records in the log"}
            version = new_version_name()
            try:
                with BackgroundStarts(os.getppid()):  # this actor's parent: the raylet
                    await asyncio.to_thread(run_train_job, self.config, snapshot, offset, version)
            except Exception:
                self.metrics.runs.inc(tags={"result": "failed"})
                raise
            finally:
                Path(snapshot).unlink(missing_ok=True)
            # The new version's state at its snapshot's offset, before it is published: its
            # replicas start from it and apply only what arrived since. Based on the new
            # version, the records it trained on add no live co-occurrence, so this costs the
            # records since the previous checkpoint and holds profiles and counts only.
            try:
                await self.checkpoint(upto=offset, version=version)
            except Exception:  # the replicas start from an older one; training is not lost
                log_.exception("checkpoint of %s failed", version)
            model_dir = Path(self.config.model_dir)
            meta = json.loads((model_dir / version / "meta.json").read_text())
            publish(model_dir, version)
            runs = Path(self.config.data_dir) / "ray_train"
            for old in collect_versions(model_dir, self.config.train.keep_versions):
                shutil.rmtree(runs / old, ignore_errors=True)
            self.last = {
                "published": version,
                "log_offset": offset,
                "seconds": round(time.perf_counter() - t0, 2),
                "metrics": meta["metrics"],
            }
            self.metrics.runs.inc(tags={"result": "published"})
            self.metrics.seconds.set(self.last["seconds"])
            if self._published is not None:
                self.metrics.published.set(0, tags={"version": self._published})
            self.metrics.published.set(1, tags={"version": version})
            self._published = version
            return self.last

    async def first_model(self, interval_s: float = FIRST_MODEL_POLL_S) -> None:
        """A deployment with no published model (`serve deploy` on a fresh cluster) trains the
        first one as soon as the log holds train.min_events records; then this stops."""
        while current_version(self.config.model_dir) is None:
            await asyncio.sleep(interval_s)
            if self.lock.locked() or current_version(self.config.model_dir) is not None:
                continue  # a retrain is under way (rec serve's first one), or just published
            try:
                if await get_log().next_offset.remote() >= self.config.train.min_events:
                    log_.info("no model published yet: training the first one")
                    await self.retrain()
            except Exception:  # logged; the next poll tries again
                log_.exception("training the first model failed")

    async def run_every(self, interval_s: float) -> None:
        """Retrain every interval once train.min_new_records have arrived since the published
        version; a failed run is logged (its snapshot deleted, nothing published) and the next
        interval tries again."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                if await self._new_records() >= self.config.train.min_new_records:
                    await self.retrain()
            except Exception:  # logged; the next interval tries again
                log_.exception("periodic retrain failed")

    async def _new_records(self) -> int:
        head = await get_log().next_offset.remote()
        model_dir = Path(self.config.model_dir)
        version = current_version(model_dir)
        if version is None:
            return head
        meta = json.loads((model_dir / version / "meta.json").read_text())
        return head - int(meta["log_offset"])


def clean_after_crash(config: RecConfig) -> list[str]:
    """What a retrain killed midway leaves, removed when the trainer (re)starts, when no run is
    under way: log snapshots, half-written version directories, and Ray Train run directories
    of versions never saved. A version saved but not published stays (a complete model someone
    may publish by hand; `collect_versions` bounds them). Returns what went."""
    gone = []
    snapshots = Path(config.data_dir) / "snapshots"
    for path in sorted(snapshots.iterdir()) if snapshots.is_dir() else []:
        path.unlink(missing_ok=True)
        gone.append(f"snapshots/{path.name}")
    model_dir, runs = Path(config.model_dir), Path(config.data_dir) / "ray_train"
    for path in sorted(model_dir.glob(".*.tmp")) if model_dir.is_dir() else []:
        shutil.rmtree(path, ignore_errors=True)
        gone.append(f"models/{path.name}")
    for path in sorted(runs.iterdir()) if runs.is_dir() else []:
        if path.is_dir() and not (model_dir / path.name / "meta.json").exists():
            shutil.rmtree(path, ignore_errors=True)
            gone.append(f"ray_train/{path.name}")
    return gone


def _apply_low(state, records: list[dict]) -> None:
    lower_own_priority()  # the replicas' requests come first
    state.apply(records)


def _save_low(state, config: RecConfig) -> Path:
    lower_own_priority()
    path = checkpoint.save(state, config.checkpoint_dir)
    checkpoint.collect(config.checkpoint_dir, config.checkpoint.keep)
    return path


def get_or_create_trainer(config: RecConfig):
    """The trainer actor, on the head node beside the log (its Ray Train job's workers go
    wherever there is CPU)."""
    return Trainer.options(
        name=TRAINER_ACTOR,
        namespace="rec",
        get_if_exists=True,
        lifetime="detached",
        max_concurrency=4,
        **actor_options(0.01, resources=ON_HEAD),
    ).remote(config.model_dump(mode="json"))
