"""The trainer's periodic retrain: it waits for train.min_new_records since the served
version, and a failed run neither stops the schedule nor publishes anything."""

from __future__ import annotations

import asyncio
import json

from deployments.trainer import Trainer
from rec.model import publish
from tests.conftest import small_config


class _Log:
    def __init__(self) -> None:
        self.head = 0

    @property
    def next_offset(self):
        log = self

        class _Remote:
            async def remote(self):
                return log.head

        return _Remote()


def _trainer(config, monkeypatch, head: int = 0):
    """The trainer actor's class built by hand around a fake log at `head`."""
    log = _Log()
    log.head = head
    cls = Trainer.__ray_actor_class__
    # the globals the methods read (the module's may be another copy after a reload)
    monkeypatch.setitem(cls._new_records.__globals__, "get_log", lambda: log)
    return cls(config.model_dump(mode="json")), log


def test_periodic_retrain_waits_for_new_records_and_survives_failures(tmp_path, monkeypatch):
    config = small_config(tmp_path)
    config.train.min_new_records = 100
    version_dir = config.model_dir / "v1"
    version_dir.mkdir(parents=True)
    (version_dir / "meta.json").write_text(json.dumps({"version": "v1", "log_offset": 50}))
    publish(config.model_dir, "v1")
    trainer, log = _trainer(config, monkeypatch)
    calls: list[int] = []

    async def retrain():
        calls.append(log.head)
        if len(calls) == 1:
            raise RuntimeError("Ray Train job failed")
        return {"published": "v2"}

    trainer.retrain = retrain

    checks: list[int] = []
    new_records = trainer._new_records

    async def counted() -> int:
        n = await new_records()
        checks.append(n)
        return n

    trainer._new_records = counted

    async def until(condition, timeout_s: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not condition():
            assert asyncio.get_running_loop().time() < deadline, (checks, calls)
            await asyncio.sleep(0.005)

    async def scenario() -> None:
        log.head = 120  # 70 records since v1's offset: not enough
        task = asyncio.ensure_future(trainer.run_every(0.01))
        await until(lambda: len(checks) >= 3)
        assert calls == [] and set(checks) == {70}
        log.head = 150  # 100 since v1: retrain, which fails
        await until(lambda: len(calls) >= 2)
        assert not task.done()  # the failure did not stop the schedule
        assert calls[:2] == [150, 150]  # and the next interval tried again
        task.cancel()

    asyncio.run(scenario())


def test_a_started_trainer_runs_its_own_schedules(tmp_path):
    """The actor starts its schedules itself, so a restarted trainer resumes them (and the
    first model's, which ends once a model is published)."""
    config = small_config(tmp_path)
    config.train.every_s, config.checkpoint.every_s = 3600.0, 60.0
    cls = Trainer.__ray_actor_class__

    async def scenario() -> list[str]:
        trainer = cls(config.model_dump(mode="json"))
        names = sorted(t.get_coro().__name__ for t in trainer.schedules)
        for t in trainer.schedules:
            t.cancel()
        return names

    assert asyncio.run(scenario()) == ["first_model", "run_checkpoints", "run_every"]
    config.train.every_s = config.checkpoint.every_s = None
    assert asyncio.run(_schedules(cls, config)) == ["first_model"]


async def _schedules(cls, config) -> list[str]:
    schedules = cls(config.model_dump(mode="json")).schedules
    for t in schedules:
        t.cancel()
    return [t.get_coro().__name__ for t in schedules]


def test_a_restarted_trainer_removes_what_a_killed_run_left(tmp_path):
    config = small_config(tmp_path)
    snapshots, runs = tmp_path / "snapshots", tmp_path / "ray_train"
    for path in (snapshots, runs / "v2", runs / "v1", config.model_dir / ".v2.tmp"):
        path.mkdir(parents=True)
    (snapshots / "00000000000000000120.parquet").write_bytes(b"x")
    (snapshots / "00000000000000000130.parquet.tmp").write_bytes(b"x")
    (config.model_dir / "v1").mkdir()
    (config.model_dir / "v1" / "meta.json").write_text("{}")
    publish(config.model_dir, "v1")

    trainer = Trainer.__ray_actor_class__(config.model_dump(mode="json"))

    assert sorted(trainer.cleaned) == [
        "models/.v2.tmp",
        "ray_train/v2",
        "snapshots/00000000000000000120.parquet",
        "snapshots/00000000000000000130.parquet.tmp",
    ]
    assert list(snapshots.iterdir()) == [] and [p.name for p in runs.iterdir()] == ["v1"]
    assert (config.model_dir / "v1" / "meta.json").exists()  # the served version is untouched


def test_a_trainer_without_a_model_trains_the_first_once_the_log_has_enough(tmp_path, monkeypatch):
    """`serve deploy` on a fresh cluster: no model published, the trainer waits for
    train.min_events records, trains the first model, and stops checking."""
    config = small_config(tmp_path)
    config.train.min_events = 10
    trainer, log = _trainer(config, monkeypatch)
    calls: list[int] = []

    async def retrain():
        calls.append(log.head)
        (config.model_dir / "v1").mkdir(parents=True)
        publish(config.model_dir, "v1")
        return {"published": "v1"}

    trainer.retrain = retrain

    async def scenario() -> None:
        log.head = 5
        task = asyncio.ensure_future(trainer.first_model(0.01))
        await asyncio.sleep(0.1)
        assert calls == [] and not task.done()  # too few records: it waits
        log.head = 20
        await asyncio.wait_for(task, 10)  # trained once, then the loop ended
        assert calls == [20]

    asyncio.run(scenario())


def test_the_first_model_loop_does_not_retrain_what_was_just_published(tmp_path, monkeypatch):
    """rec serve trains the first model itself: if it is published while the loop sleeps, the
    loop's next wake-up must not start a second Train job (on 2 cores it took the CPU the
    replicas needed)."""
    config = small_config(tmp_path)
    trainer, log = _trainer(config, monkeypatch, head=100)
    calls: list[int] = []

    async def retrain():
        calls.append(log.head)

    trainer.retrain = retrain

    async def scenario() -> None:
        task = asyncio.ensure_future(trainer.first_model(0.05))
        await asyncio.sleep(0.01)  # the loop sleeps: a retrain elsewhere publishes v1
        (config.model_dir / "v1").mkdir(parents=True)
        publish(config.model_dir, "v1")
        await asyncio.wait_for(task, 5)
        assert calls == []

    asyncio.run(scenario())
