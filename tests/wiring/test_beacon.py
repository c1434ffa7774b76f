"""The log's head offset in shared memory (deployments/beacon.py) and the read-your-writes
fast path of a replica's live state built on it."""

from __future__ import annotations

import asyncio

import numpy as np

from deployments.beacon import EVERYONE, NOBODY, RING, HeadReader, HeadWriter, owner, user_key
from deployments.eventlog import EventLogService, LocalHandle
from deployments.live import Live
from rec.config import RecConfig
from rec.events import ItemIn, event_record, impression_record, item_record, user_delete_record


def test_a_reader_sees_each_published_head(tmp_path) -> None:
    writer = HeadWriter(tmp_path)
    reader = HeadReader.open(writer.info())
    assert reader is not None and reader.head() == 0
    writer.publish(41)
    assert reader.head() == 41


def test_other_machines_and_other_files_are_refused(tmp_path) -> None:
    info = HeadWriter(tmp_path).info()
    assert HeadReader.open({**info, "machine": "elsewhere/boot"}) is None
    assert HeadReader.open({**info, "nonce": info["nonce"] + 1}) is None
    assert HeadReader.open(None) is None


def test_a_restarted_writer_invalidates_old_readers(tmp_path) -> None:
    first = HeadWriter(tmp_path)
    first.publish(7)
    reader = HeadReader.open(first.info())
    second = HeadWriter(tmp_path)  # the actor restarted: same file, new nonce
    second.publish(9)
    assert reader.head() is None  # the replica must ask the actor again
    assert HeadReader.open(second.info()).head() == 9


def test_the_ring_says_whom_unapplied_records_concern(tmp_path) -> None:
    writer = HeadWriter(tmp_path)
    reader = HeadReader.open(writer.info())
    writer.mark(0, [user_key("u"), NOBODY, user_key("v")])
    writer.publish(3)
    assert reader.concerns("u", 0, 3) and reader.concerns("v", 1, 3)
    assert not reader.concerns("w", 0, 3) and not reader.concerns("u", 1, 3)
    writer.mark(3, [EVERYONE])  # a catalogue record concerns every request
    writer.publish(4)
    assert reader.concerns("w", 0, 4) and not reader.concerns("w", 0, 3)
    assert reader.concerns("w", 10, 10 + RING + 1)  # too far behind to tell
    writer.mark(5, [NOBODY] * (RING + 2))  # a batch that laps the ring while one reads
    assert reader.concerns("w", 4, 5)


def test_owners_of_records() -> None:
    assert owner(event_record(user_id="u", item_id="i", type="click", ts=1.0)) == user_key("u")
    assert owner(user_delete_record("u", 1.0)) == user_key("u")
    assert owner(impression_record("u", "r", ["i"], None, 1.0)) == NOBODY
    assert owner(item_record(ItemIn(item_id="i"), 1.0)) == EVERYONE
    assert user_key("u") == user_key("u") != user_key("v") and user_key("") > 0


def _counted_log(config: RecConfig) -> tuple[LocalHandle, list[int]]:
    """An in-process EventLog actor whose reads are recorded (their start offsets)."""
    log = LocalHandle(lambda: EventLogService(str(config.log_dir), config.eventlog.model_dump()))
    reads: list[int] = []
    real_read = log._obj.read

    async def counted(start, limit=10_000):
        reads.append(start)
        return await real_read(start, limit)

    log._obj.read = counted
    return log, reads


def _run(scenario, log: LocalHandle) -> None:
    try:
        asyncio.run(scenario())
    finally:
        log.close()


def test_live_reads_the_log_only_when_the_head_moved(tmp_path) -> None:
    config = RecConfig(data_dir=tmp_path)
    log, reads = _counted_log(config)

    async def scenario() -> None:
        live = Live(config, log)
        await live.start()
        assert live._head is not None  # same machine: the fast path is on
        before = len(reads)
        for _ in range(5):
            await live.sync()
        assert len(reads) == before  # nothing appended: no log call
        await log.append.remote([event_record(user_id="u", item_id="i", type="click", ts=1.0)])
        await live.sync()  # acknowledged before this request: it must be applied
        assert len(reads) == before + 1 and live.rec.offset == 1
        assert "u" in live.rec.profiles.users
        live.stop()

    _run(scenario, log)
    assert np.fromfile(config.log_dir / "HEAD", np.int64)[0] == 1


def test_impressions_alone_cost_followers_no_read(tmp_path) -> None:
    config = RecConfig(data_dir=tmp_path)
    log, reads = _counted_log(config)
    shown = impression_record("u", "r1", ["i"], None, 1.0)

    async def scenario() -> None:
        live = Live(config, log)
        await live.start()
        before = len(reads)
        await log.append.remote([shown, shown])  # offsets 0 and 1: training's, not serving's
        await live.sync()
        assert len(reads) == before and live.rec.offset == 0
        await log.append.remote([event_record(user_id="u", item_id="i", type="click", ts=2.0)])
        await live.sync()  # the event moves the head: one read brings both impressions and it
        assert len(reads) == before + 1 and live.rec.offset == 3
        assert "u" in live.rec.profiles.users
        assert await log.next_offset.remote() == 3  # every record is in the log all the same
        live.stop()

    _run(scenario, log)


def test_a_replica_applies_its_own_acknowledged_events_without_reading_them(tmp_path) -> None:
    config = RecConfig(data_dir=tmp_path)
    log, reads = _counted_log(config)
    mine = [event_record(user_id="u", item_id="i", type="click", ts=1.0)]
    theirs = [event_record(user_id="v", item_id="j", type="click", ts=2.0)]

    async def scenario() -> None:
        live = Live(config, log)
        await live.start()
        before = len(reads)
        first, _ = await log.append.remote(mine)
        assert live.apply_own(mine, first)
        await live.sync()  # the head is where this replica is: no read
        assert len(reads) == before and live.rec.offset == 1 and "u" in live.rec.profiles.users
        await log.append.remote(theirs)  # another replica's event: this one has not read it
        first, _ = await log.append.remote(mine)
        assert not live.apply_own(mine, first)  # offset 1 is missing here: nothing applied
        assert live.rec.offset == 1
        await live.sync()  # one read brings both, in order
        assert len(reads) == before + 1 and live.rec.offset == 3
        assert live.rec.profiles.users["u"].counts == {"click": 2}
        assert "v" in live.rec.profiles.users
        live.stop()

    _run(scenario, log)


def test_only_records_that_concern_a_request_make_it_wait(tmp_path) -> None:
    """Another user's click is applied in the background; the user's own events and catalogue
    changes are applied before the request is served."""
    config = RecConfig(data_dir=tmp_path)
    log, reads = _counted_log(config)

    async def scenario() -> None:
        live = Live(config, log)
        await live.start()
        before = len(reads)
        await log.append.remote([event_record(user_id="v", item_id="j", type="click", ts=1.0)])
        await live.sync(user="u")  # served at once: nothing of u's is unapplied
        assert live.rec.offset == 0 and "v" not in live.rec.profiles.users
        await live._catching_up  # ... and the catch-up applies it meanwhile
        assert live.rec.offset == 1 and "v" in live.rec.profiles.users
        assert len(reads) == before + 1
        await log.append.remote([event_record(user_id="u", item_id="i", type="click", ts=2.0)])
        await live.sync(user="u")
        assert live.rec.offset == 2 and "u" in live.rec.profiles.users
        await log.append.remote([item_record(ItemIn(item_id="new", category="c"), 3.0)])
        await live.sync(user="w")  # a catalogue change concerns everyone
        assert live.rec.offset == 3 and "new" in live.rec.catalog.index
        assert len(reads) == before + 3
        live.stop()

    _run(scenario, log)
