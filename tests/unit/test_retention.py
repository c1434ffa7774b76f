"""The event log's retention policy: behaviour records of old (or, over the size bound, the
oldest) sealed segments are removed; catalogue records, tombstones, offsets, the active
segment and everything a kept checkpoint still needs stay."""

from __future__ import annotations

import time

import pytest

from rec import eventlog
from rec.config import EventLogConfig
from rec.eventlog import EventLog
from rec.events import ItemIn, event_record, impression_record, item_record, user_delete_record

DAY = 86400.0
NOW = float(int(time.time()))  # the log actor expires against the clock


def day_of_records(day: float, n_events: int = 6) -> list[dict]:
    """One segment's worth (segment_max_records 10): an item, a tombstone, events and an
    impression, all at NOW - day days."""
    ts = NOW - day * DAY
    item = ItemIn(item_id=f"i{int(day)}", category="c", title=f"item of day {day}")
    return [
        item_record(item, ts),
        user_delete_record(f"gone{int(day)}", ts),
        *(
            event_record(user_id=f"u{k}", item_id=f"i{int(day)}", type="click", ts=ts + k)
            for k in range(n_events)
        ),
        impression_record("u0", f"r{int(day)}", [f"i{int(day)}"], "v1", ts),
        event_record(user_id="u9", item_id="i0", type="view", ts=ts),
    ]


def make_log(path, days=(40, 35, 20, 1, 0), **policy) -> tuple[EventLog, list[dict]]:
    log = EventLog(path, EventLogConfig(segment_max_records=10, **policy))
    written = []
    for day in days:
        recs = day_of_records(day)
        first, _ = log.append(recs)
        written += [{"offset": first + i, **r} for i, r in enumerate(recs)]
    return log, written


def kinds(records: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        out[r["kind"]] = out.get(r["kind"], 0) + 1
    return out


def test_no_policy_removes_nothing(tmp_path):
    log, written = make_log(tmp_path)
    assert log.expire(protect_from=log.next_offset, now=NOW)["expired_records"] == 0
    assert log.read() == written


def test_age_removes_behaviour_of_old_sealed_segments_only(tmp_path):
    log, written = make_log(tmp_path, retention_max_age_s=30 * DAY)
    head = log.next_offset
    out = log.expire(protect_from=head, now=NOW)
    assert out["expired_records"] == 2 * 8  # days 40 and 35: 7 events + 1 impression each
    assert out["ranges"] == [(0, 10), (10, 20)]
    kept = log.read()
    old = [r for r in written if r["offset"] < 20]
    assert [r for r in kept if r["offset"] < 20] == [
        r for r in old if r["kind"] in ("item", "user_delete")
    ]
    assert [r for r in kept if r["offset"] >= 20] == [r for r in written if r["offset"] >= 20]
    assert log.next_offset == head
    # the catalogue replays whole: every item record is still there
    assert sorted(r["item_id"] for r in kept if r["kind"] == "item") == [
        "i0",
        "i1",
        "i20",
        "i35",
        "i40",
    ]
    # a second pass finds nothing more to do, and a reopened log reads the same
    assert log.expire(protect_from=head, now=NOW)["expired_records"] == 0
    log.close()
    with EventLog(tmp_path, log.config) as again:
        assert again.read() == kept and again.next_offset == head
        first, _ = again.append(day_of_records(0, 1))
        assert first == head


def test_what_a_checkpoint_needs_and_the_active_segment_are_never_expired(tmp_path):
    log, written = make_log(tmp_path, days=(50, 45, 40), retention_max_age_s=DAY)
    # only the first segment is wholly below offset 15
    out = log.expire(protect_from=15, now=NOW)
    assert out["expired_records"] == 8 and out["ranges"] == [(0, 10)]
    assert [r for r in log.read() if r["offset"] >= 10] == written[10:]
    # everything below the head: the active (last) segment still keeps its records
    out = log.expire(protect_from=log.next_offset, now=NOW)
    assert out["expired_records"] == 8 and out["ranges"] == [(10, 20)]
    assert [r for r in log.read() if r["offset"] >= 20] == written[20:]


def test_size_bound_expires_oldest_segments_first(tmp_path):
    log, _ = make_log(tmp_path)
    total = sum(p.stat().st_size for p in tmp_path.glob("*.seg"))
    log.close()
    log = EventLog(tmp_path, EventLogConfig(segment_max_records=10, retention_max_bytes=total - 1))
    out = log.expire(protect_from=log.next_offset, now=NOW)
    assert out["segments"] == ["00000000000000000000.seg"]  # one was enough, the oldest
    assert not out["over_budget"] and out["bytes"] < total
    # a bound nothing can meet: every sealed segment goes, then it says so
    log.close()
    log = EventLog(tmp_path, EventLogConfig(segment_max_records=10, retention_max_bytes=1))
    out = log.expire(protect_from=log.next_offset, now=NOW)
    assert len(out["segments"]) == 3 and out["over_budget"]
    assert kinds(log.read(40)) == {"item": 1, "user_delete": 1, "event": 7, "impression": 1}


@pytest.mark.parametrize("merge", [64, 3])
def test_expired_rows_leave_the_tail_cache_too(tmp_path, monkeypatch, merge):
    """Also when the cache has merged frames into a batch that spans expired and kept
    segments (merge=3: offsets 0..29 in one batch, 0..19 expired)."""
    monkeypatch.setattr(eventlog, "TAIL_MERGE_FRAMES", merge)
    log, written = make_log(tmp_path, retention_max_age_s=30 * DAY)
    assert len(log._tail) == (5 if merge == 64 else 3)
    assert log.read(0) == written  # served from the cache (it holds the whole log)
    log.expire(protect_from=log.next_offset, now=NOW)
    after = log.read(0)
    assert kinds([r for r in after if r["offset"] < 20]) == {"item": 2, "user_delete": 2}
    assert [r for r in after if r["offset"] >= 20] == written[20:]


@pytest.mark.parametrize("field", ["retention_max_age_s", "retention_max_bytes"])
def test_policy_must_be_positive(field):
    with pytest.raises(ValueError):
        EventLogConfig(**{field: 0})


def test_the_log_actor_expires_on_disk_and_in_memory(tmp_path):
    """EventLogService.expire: followers reading from its memory see placeholders, never the
    expired rows, and records outside the expired segments unchanged."""
    import asyncio

    from deployments.eventlog import FORGOTTEN, EventLogService

    async def scenario():
        policy = {"segment_max_records": 10, "retention_max_age_s": 30 * DAY}
        service = EventLogService(str(tmp_path / "log"), policy)
        for day in (40, 35, 20, 0):
            await service.append(day_of_records(day))
        out = await service.expire(protect_from=service.log.next_offset)
        return out, await service.read(0)

    out, read = asyncio.run(scenario())
    assert out["ranges"] == [(0, 10), (10, 20)]
    below = [r for r in read if r["offset"] < 20]
    assert {r["kind"] for r in below} == {"item", "user_delete", FORGOTTEN}
    assert [r["offset"] for r in read] == list(range(40))  # offsets stay dense in memory
    assert kinds([r for r in read if r["offset"] >= 20])["event"] == 14


def test_the_trainer_expires_below_the_oldest_kept_checkpoint(tmp_path):
    import asyncio

    from deployments.trainer import Trainer
    from tests.conftest import small_config

    config = small_config(tmp_path)
    for name in (
        "00000000000000000500-v1",
        "00000000000000000300-v1",
        ".00000000000000000900-v2.tmp",
    ):
        (config.checkpoint_dir / name).mkdir(parents=True)
        if not name.startswith("."):
            (config.checkpoint_dir / name / "meta.json").write_text("{}")
    calls = []

    class _Log:
        class expire:  # noqa: N801 - the shape of an actor method
            @staticmethod
            async def remote(protect_from):
                calls.append(protect_from)
                return {"expired_records": 0, "segments": [], "ranges": []}

    trainer = Trainer.__ray_actor_class__(config.model_dump(mode="json"))
    asyncio.run(trainer._expire(_Log()))
    assert calls == []  # no policy configured: the log is not asked
    trainer.config.eventlog.retention_max_bytes = 10**9
    asyncio.run(trainer._expire(_Log()))
    assert calls == [300]
