"""The log's head offset in shared memory (rec/beacon.py) and the read-your-writes
fast path of a replica's live state built on it."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import numpy as np

from deployments.eventlog import EventLogService, LocalHandle
from rec.beacon import (
    EVERYONE,
    NOBODY,
    RECENT_BYTES,
    RECENT_FILE,
    RING,
    HeadReader,
    HeadWriter,
    owner,
    user_key,
)
from rec.config import RecConfig
from rec.events import ItemIn, event_record, impression_record, item_record, user_delete_record
from rec.live import Live


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


def _stored(first: int, n: int, user: str = "u", size: int = 0) -> list[dict]:
    """n committed event records from offset `first`, as the actor stores them."""
    return [
        {
            **event_record(user_id=user, item_id="i" * max(size, 1), type="click", ts=1.0),
            "offset": first + k,
        }
        for k in range(n)
    ]


def test_the_records_ring_serves_any_committed_range(tmp_path) -> None:
    writer = HeadWriter(tmp_path)
    reader = HeadReader.open(writer.info())
    batches = [_stored(0, 3), _stored(3, 1), _stored(4, 5, user="v")]
    for batch in batches:
        writer.remember(batch)
    everything = [r for batch in batches for r in batch]
    assert reader.recent(0, 9) == everything
    assert reader.recent(4, 9) == everything[4:]
    assert reader.recent(1, 4) == everything[1:4]  # from inside a batch
    assert reader.recent(9, 9) == []
    assert reader.recent(0, 10) is None  # offset 9 was never written here


def test_the_records_ring_wraps_and_refuses_what_it_no_longer_holds(tmp_path) -> None:
    writer = HeadWriter(tmp_path)
    reader = HeadReader.open(writer.info())
    size = RECENT_BYTES // 40  # each batch's entry is a bit over 1/40 of the ring
    offset = 0
    for _ in range(100):  # 2.5 laps: entries straddle the end of the ring more than once
        writer.remember(_stored(offset, 1, size=size))
        offset += 1
    assert reader.recent(offset - 30, offset) == [
        r for k in range(offset - 30, offset) for r in _stored(k, 1, size=size)
    ]
    assert reader.recent(offset - 50, offset) is None  # lapped: ask the actor
    writer.remember(_stored(offset, 1, size=RECENT_BYTES // 2 + 1))  # too big for the ring
    assert reader.recent(offset - 1, offset + 1) is None
    assert reader.recent(offset - 1, offset) is not None


def test_a_read_overtaken_by_the_writer_is_refused(tmp_path, monkeypatch) -> None:
    writer = HeadWriter(tmp_path)
    reader = HeadReader.open(writer.info())
    writer.remember(_stored(0, 2))
    maps = reader._recent
    real_get = type(maps).get

    def get_then_lapped(self, pos, n):  # the writer laps the ring while this copy runs
        out = real_get(self, pos, n)
        if n > 24:
            for k in range(2, 5):  # three thirds of the ring: the first bytes are reused
                writer.remember(_stored(k, 1, size=RECENT_BYTES // 3))
        return out

    monkeypatch.setattr(type(maps), "get", get_then_lapped)
    assert reader.recent(0, 2) is None


def test_forgetting_wipes_the_ring_and_a_restart_invalidates_it(tmp_path) -> None:
    writer = HeadWriter(tmp_path)
    reader = HeadReader.open(writer.info())
    writer.remember(_stored(0, 2, user="gone-user"))
    assert b"gone-user" in (tmp_path / RECENT_FILE).read_bytes()
    writer.forget_recent()
    assert b"gone-user" not in (tmp_path / RECENT_FILE).read_bytes()
    assert reader.recent(0, 2) is None
    writer.remember(_stored(2, 1))  # new batches are served again
    assert reader.recent(2, 3) == _stored(2, 1)
    writer.remember(_stored(3, 1, user="earlier-user"))
    HeadWriter(tmp_path)  # the actor restarted: what the old one wrote is neither served nor kept
    assert reader.recent(2, 4) is None
    assert b"earlier-user" not in (tmp_path / RECENT_FILE).read_bytes()


def _live(tmp_path, body, config: RecConfig | None = None) -> None:
    """Run `await body(live, log, reads)`: a started Live following an in-process EventLog
    actor, with its reads counted from here on ("log": actor calls; "ring": ranges served by
    the records ring; "ring refused": ranges it could not serve)."""
    config = config if config is not None else RecConfig(data_dir=tmp_path)
    log = LocalHandle(lambda: EventLogService(str(config.log_dir), config.eventlog.model_dump()))
    reads: Counter = Counter()
    actor_read = log._obj.read

    async def counted_read(start, limit=10_000):
        reads["log"] += 1
        return await actor_read(start, limit)

    log._obj.read = counted_read

    async def scenario() -> None:
        live = Live(config, log)
        await live.start()
        assert live._head is not None  # same machine: the fast path is on
        ring_read = live._head.recent

        def counted_recent(start, head):
            out = ring_read(start, head)
            reads["ring" if out is not None else "ring refused"] += 1
            return out

        live._head.recent = counted_recent
        reads.clear()
        try:
            await body(live, log, reads)
        finally:
            live.stop()

    try:
        asyncio.run(scenario())
    finally:
        log.close()


def _click(user: str, item: str = "i", ts: float = 1.0) -> list[dict]:
    return [event_record(user_id=user, item_id=item, type="click", ts=ts)]


def test_live_reads_only_when_the_head_moved_and_then_from_the_ring(tmp_path) -> None:
    async def body(live, log, reads) -> None:
        for _ in range(5):
            await live.sync()
        assert not reads  # nothing appended: nothing read
        await log.append.remote(_click("u"))
        await live.sync()  # acknowledged before this request: it must be applied
        assert reads == {"ring": 1} and live.rec.offset == 1
        assert "u" in live.rec.profiles.users

    _live(tmp_path, body)
    assert np.fromfile(tmp_path / "log" / "HEAD", np.int64)[0] == 1


def test_what_the_ring_cannot_serve_is_read_from_the_log(tmp_path) -> None:
    async def body(live, log, reads) -> None:
        await log.append.remote(_click("u"))
        await log.append.remote(_click("x"))
        await log.forget_user.remote("x")  # wipes the ring (x's event was in it)
        await log.append.remote(_click("v", "j", 2.0))
        await live.sync()  # offsets 0 and 1 are gone from the ring: one log read brings all
        assert reads == {"ring refused": 1, "log": 1} and live.rec.offset == 3
        assert {"u", "v"} <= set(live.rec.profiles.users) and "x" not in live.rec.profiles.users

    _live(tmp_path, body)


def test_impressions_alone_cost_followers_no_read(tmp_path) -> None:
    shown = impression_record("u", "r1", ["i"], None, 1.0)

    async def body(live, log, reads) -> None:
        await log.append.remote([shown, shown])  # offsets 0 and 1: training's, not serving's
        await live.sync()
        assert not reads and live.rec.offset == 0
        await log.append.remote(_click("u", ts=2.0))
        await live.sync()  # the event moves the head: one read brings both impressions and it
        assert reads == {"ring": 1} and live.rec.offset == 3
        assert "u" in live.rec.profiles.users
        assert await log.next_offset.remote() == 3  # every record is in the log all the same

    _live(tmp_path, body)


def test_a_replica_applies_its_own_acknowledged_events_without_reading_them(tmp_path) -> None:
    mine = _click("u")

    async def body(live, log, reads) -> None:
        first, _ = await log.append.remote(mine)
        assert live.apply_own(mine, first)
        await live.sync()  # the head is where this replica is: no read
        assert not reads and live.rec.offset == 1 and "u" in live.rec.profiles.users
        await log.append.remote(_click("v", "j", 2.0))  # another replica's event: not read here
        first, _ = await log.append.remote(mine)
        assert not live.apply_own(mine, first)  # offset 1 is missing here: nothing applied
        assert live.rec.offset == 1
        await live.sync()  # one read brings both, in order
        assert reads == {"ring": 1} and live.rec.offset == 3
        assert live.rec.profiles.users.get("u").counts == {"click": 2}
        assert "v" in live.rec.profiles.users

    _live(tmp_path, body)


def test_only_records_that_concern_a_request_make_it_wait(tmp_path) -> None:
    """Another user's click is applied in the background; the user's own events and catalogue
    changes are applied before the request is served."""

    async def body(live, log, reads) -> None:
        await log.append.remote(_click("v", "j"))
        await live.sync(user="u")  # served at once: nothing of u's is unapplied
        assert live.rec.offset == 0 and "v" not in live.rec.profiles.users
        await live._catching_up  # ... and the catch-up applies it meanwhile
        assert live.rec.offset == 1 and "v" in live.rec.profiles.users
        assert reads == {"ring": 1}
        await log.append.remote(_click("u", ts=2.0))
        await live.sync(user="u")
        assert live.rec.offset == 2 and "u" in live.rec.profiles.users
        await log.append.remote([item_record(ItemIn(item_id="new", category="c"), 3.0)])
        await live.sync(user="w")  # a catalogue change concerns everyone
        assert live.rec.offset == 3 and "new" in live.rec.catalog.index
        assert reads == {"ring": 3}

    _live(tmp_path, body)


def test_a_replica_on_another_ray_node_follows_through_the_actor(tmp_path) -> None:
    """Several Ray nodes on one machine behave as a cluster's: the log hands its head file only
    to readers on its own node (`from_node` names the reader's); another node's replica reads
    every record through the actor, and the log counts who did what."""
    from deployments.eventlog import _NodeLog

    config = RecConfig(data_dir=tmp_path)
    log = LocalHandle(lambda: EventLogService(str(config.log_dir), config.eventlog.model_dump()))
    log._obj.node = "head-node"
    service = log._obj
    assert service.head_info("head-node")["node"] == "head-node"
    assert service.head_info("worker-node") is None
    assert service.head_info()["path"]  # a reader that names no node: the machine check alone

    async def scenario() -> None:
        here, there = Live(config, _NodeLog(log, "head-node")), Live(config, _NodeLog(log, "w"))
        for live in (here, there):
            await live.start()
        assert here._head is not None and there._head is None
        await log.append.remote(_click("u"))
        before = service.reader_stats()["reads"]
        await there.sync(user="u")
        await here.sync(user="u")
        assert there.rec.offset == here.rec.offset == 1 and "u" in there.rec.profiles.users
        stats = service.reader_stats()
        assert stats["reads"]["w"] == before.get("w", 0) + 1  # the actor served the other node
        assert stats["reads"].get("head-node", 0) == before.get("head-node", 0)  # the ring did
        assert stats["ring_refused"] == {"worker-node": 1, "w": 1}
        for live in (here, there):
            live.stop()

    try:
        asyncio.run(scenario())
    finally:
        log.close()


def test_a_replica_that_cannot_follow_reports_it_for_the_health_check(tmp_path) -> None:
    """Live.problem (what the deployments' check_health raises): healthy while following;
    catch-ups failing MAX_SYNC_FAILURES times in a row, or a dead model watcher, are reported;
    one success clears the failures."""
    from rec.live import MAX_SYNC_FAILURES

    async def body(live, log, reads) -> None:
        assert live.problem() is None
        real = live._pages

        async def broken(start):
            raise ConnectionError("log actor unreachable")
            yield  # an async generator, as _pages is

        live._pages = broken
        for n in range(MAX_SYNC_FAILURES):
            await log.append.remote(_click(f"x{n}"))
            await live._catch_up_now()
        assert "catch-ups with the log failed" in live.problem()
        live._pages = real
        await log.append.remote(_click("back"))
        await live._catch_up_now()
        assert live.problem() is None and "back" in live.rec.profiles.users
        live._reloader.cancel()
        await asyncio.sleep(0)
        assert live.problem() == "the model watcher stopped"

    _live(tmp_path, body)


def test_a_retried_append_is_acknowledged_and_followed_once(tmp_path) -> None:
    """The log actor's group commit with a resent call (same token) among new ones: one
    write, both callers answered the same offsets, followers see the records once."""

    async def body(live, log, reads) -> None:
        first = await log.append.remote(_click("u"), "tok-1")
        again, other = await asyncio.gather(
            log.append.remote(_click("u"), "tok-1"), log.append.remote(_click("w"), "tok-2")
        )
        assert again == first == (0, 0) and other == (1, 1)
        await live.sync()
        assert live.rec.offset == 2
        assert [r["user_id"] for r in await log.read.remote(0)] == ["u", "w"]

    _live(tmp_path, body)


def _resident_kb(path) -> int:
    """This process's resident KiB of its mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):
            inside = len(fields) > 5 and fields[5] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


def test_the_records_ring_is_resident_from_the_start_in_writer_and_reader(tmp_path) -> None:
    """The ring's fixed size shows at once, not as growth while it first fills."""
    writer = HeadWriter(tmp_path)
    path = (tmp_path / RECENT_FILE).resolve()
    assert _resident_kb(path) >= RECENT_BYTES // 1024
    reader = HeadReader.open(writer.info())
    assert reader is not None
    assert _resident_kb(path) >= 2 * (RECENT_BYTES // 1024)  # the reader's own mapping too
