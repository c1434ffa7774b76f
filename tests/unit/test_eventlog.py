"""Event log: round trips, reopen, torn-tail recovery, corruption, segments, cache, snapshots,
erasure, atomic appends and a SIGKILL crash loop."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rec import eventlog
from rec.config import EventLogConfig
from rec.eventlog import SCHEMA, CorruptLogError, EventLog
from rec.events import event_record, user_delete_record

REPO = Path(__file__).resolve().parents[2]
USERS = ("alice", "bob", "carol", "dave")


def make_records(n: int, seed: int) -> list[dict]:
    """Seeded event records; every third value is None."""
    rng = random.Random(seed)
    return [
        {
            "kind": "event",
            "user_id": rng.choice(USERS),
            "item_id": f"item{rng.randrange(1000)}",
            "type": rng.choice(("view", "click", "rating")),
            "value": None if i % 3 == 0 else round(rng.uniform(0, 5), 3),
            "ts": 1_700_000_000.0 + i,
            "context": None if i % 2 else '{"device":"ios"}',
            "request_id": None,
            "payload": None,
        }
        for i in range(n)
    ]


def with_offsets(records: list[dict], first: int = 0) -> list[dict]:
    return [{"offset": first + i, **r} for i, r in enumerate(records)]


def segments(path: Path) -> list[Path]:
    return sorted(path.glob("*.seg"))


def append_frames(log: EventLog, sizes: list[int], seed: int) -> list[dict]:
    """Append one frame per size; returns all appended records with their offsets."""
    out: list[dict] = []
    for k, n in enumerate(sizes):
        recs = make_records(n, seed + k)
        first, last = log.append(recs)
        assert (first, last) == (len(out), len(out) + n - 1)
        out += with_offsets(recs, first)
    return out


def flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_round_trip_offsets_none_start_limit(tmp_path: Path) -> None:
    with EventLog(tmp_path) as log:
        expected = append_frames(log, [10, 5], seed=1)
        assert log.next_offset == 15
        assert log.read() == expected
        assert sum(r["value"] is None for r in log.read()) == 6
        assert log.read(7) == expected[7:]
        assert log.read(3, limit=4) == expected[3:7]
        assert log.read(3, limit=0) == []
        assert log.read(15) == []
        table = log.table(5, 12)
        assert table.schema == SCHEMA
        assert table.to_pylist() == expected[5:12]
        assert log.table(12, 12).num_rows == 0

        assert log.append([{"kind": "user_delete", "user_id": "bob", "ts": 5.0}]) == (15, 15)
        blank = dict.fromkeys(SCHEMA.names)
        assert log.read(15) == [
            blank | {"offset": 15, "kind": "user_delete", "user_id": "bob", "ts": 5.0}
        ]


def test_reopen_restores_records_and_next_offset(tmp_path: Path) -> None:
    with EventLog(tmp_path) as log:
        expected = append_frames(log, [4, 6, 3], seed=2)
    with EventLog(tmp_path) as log:
        assert log.recovered_bytes_cut == 0
        assert log.next_offset == 13
        assert log.read() == expected
        more = make_records(2, seed=99)
        assert log.append(more) == (13, 14)
        expected += with_offsets(more, 13)
    with EventLog(tmp_path) as log:
        assert log.read() == expected
        assert log.next_offset == 15


@pytest.mark.parametrize("damage", ["garbage", "header_only", "truncated_frame", "flipped_body"])
def test_torn_tail_is_cut_on_open(tmp_path: Path, damage: str) -> None:
    with EventLog(tmp_path) as log:
        log.append(make_records(3, seed=3))
        log.append(make_records(4, seed=4))
        seg = segments(tmp_path)[0]
        size_before_last = seg.stat().st_size
        expected = log.read() + with_offsets(make_records(5, seed=5), 7)
        log.append(make_records(5, seed=5))
    seg = segments(tmp_path)[0]
    data = seg.read_bytes()
    size_before = len(data)
    last_frame = data[size_before_last:]
    tail = {
        "garbage": b"\x00\x01 not a frame " * 3,
        "header_only": last_frame[:7],
        "truncated_frame": last_frame[: len(last_frame) // 2],
        "flipped_body": last_frame[:20] + bytes([last_frame[20] ^ 0xFF]) + last_frame[21:],
    }[damage]
    seg.write_bytes(data + tail)

    with EventLog(tmp_path) as log:
        assert log.recovered_bytes_cut == len(tail)
        assert seg.stat().st_size == size_before
        assert log.read() == expected
        assert log.next_offset == 12
        assert log.append(make_records(2, seed=6)) == (12, 13)
        expected += with_offsets(make_records(2, seed=6), 12)
    with EventLog(tmp_path) as log:
        assert log.recovered_bytes_cut == 0
        assert log.read() == expected


def test_torn_first_frame_of_new_segment_leaves_it_empty(tmp_path: Path) -> None:
    config = EventLogConfig(segment_max_records=4)
    with EventLog(tmp_path, config) as log:
        expected = append_frames(log, [4, 3], seed=7)
    last = segments(tmp_path)[-1]
    assert last.name == f"{4:020d}.seg"
    last.write_bytes(last.read_bytes()[:-5])
    with EventLog(tmp_path, config) as log:
        assert log.recovered_bytes_cut > 0
        assert last.stat().st_size == 0
        assert log.next_offset == 4
        assert log.read() == expected[:4]
        assert log.append(make_records(1, seed=8)) == (4, 4)
    with EventLog(tmp_path, config) as log:
        assert log.read() == expected[:4] + with_offsets(make_records(1, seed=8), 4)


def test_bad_frame_followed_by_valid_data_is_corruption(tmp_path: Path) -> None:
    with EventLog(tmp_path) as log:
        append_frames(log, [3, 3, 3], seed=9)
    seg = segments(tmp_path)[0]
    flip_byte(seg, 30)  # in the body of the first frame
    with pytest.raises(CorruptLogError):
        EventLog(tmp_path)


def test_corruption_in_sealed_segment_raises(tmp_path: Path) -> None:
    config = EventLogConfig(segment_max_records=6)
    with EventLog(tmp_path, config) as log:
        expected = append_frames(log, [3, 3, 3, 3, 3, 3], seed=10)
    sealed = segments(tmp_path)[0]
    original = sealed.read_bytes()
    flip_byte(sealed, len(original) // 2 + 40)  # inside the sealed segment's second frame
    with EventLog(tmp_path, config) as log:
        assert log.read(12) == expected[12:]  # untouched segments stay readable
        with pytest.raises(CorruptLogError):
            log.read(0)
        with pytest.raises(CorruptLogError):
            log.snapshot(tmp_path / "snap")

    assert not list(tmp_path.rglob("*.tmp"))
    sealed.write_bytes(original[:-3])  # a sealed segment cut short
    with EventLog(tmp_path, config) as log, pytest.raises(CorruptLogError):
        log.read(0)


def test_segments_roll_without_splitting_frames(tmp_path: Path) -> None:
    config = EventLogConfig(segment_max_records=10)
    with EventLog(tmp_path, config) as log:
        expected = append_frames(log, [4] * 10, seed=11)
        assert [p.name for p in segments(tmp_path)] == [f"{o:020d}.seg" for o in (0, 12, 24, 36)]
        assert log.read(10, limit=20) == expected[10:30]
        big = make_records(25, seed=12)  # larger than a segment, yet never split
        assert log.append(big) == (40, 64)
        expected += with_offsets(big, 40)
        log.append(make_records(1, seed=13))
        expected += with_offsets(make_records(1, seed=13), 65)
        assert [p.name for p in segments(tmp_path)][-2:] == [f"{36:020d}.seg", f"{65:020d}.seg"]
    with EventLog(tmp_path, config) as log:
        assert log.next_offset == 66
        assert log.read() == expected
        assert log.table(5, 33).to_pylist() == expected[5:33]
        assert log.read(23, limit=3) == expected[23:26]


@pytest.mark.parametrize(("merge", "coalesce"), [(64, 256), (2, 3)])
def test_tail_cache_and_disk_reads_agree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, merge: int, coalesce: int
) -> None:
    """Also with the cache's frames merged in twos and frames read from disk merged in threes
    (batches spanning segment boundaries)."""
    monkeypatch.setattr(eventlog, "TAIL_MERGE_FRAMES", merge)
    monkeypatch.setattr(eventlog, "COALESCE_FRAMES", coalesce)
    config = EventLogConfig(segment_max_records=9, tail_cache_records=7)
    sizes = [random.Random(14).randint(1, 5) for _ in range(12)]
    with EventLog(tmp_path, config) as cached:
        expected = append_frames(cached, sizes, seed=14)
        n = len(expected)
        with EventLog(tmp_path, config) as disk:  # a reader opened after the fact: no cache
            for start in range(n + 2):
                for limit in (None, 0, 1, 3, 50):
                    assert (
                        cached.read(start, limit)
                        == disk.read(start, limit)
                        == expected[start:][:limit]
                    )
                for end in (start, start + 2, n, None):
                    assert cached.table(start, end) == disk.table(start, end)

        def no_disk(*args: object) -> None:
            raise AssertionError("read went to disk")

        monkeypatch.setattr(cached, "_segment_batches", no_disk)
        assert cached.read(n - 3) == expected[n - 3 :]
        assert cached.read(n) == []
        with pytest.raises(AssertionError, match="went to disk"):
            cached.read(0)


@pytest.mark.parametrize("coalesce", [256, 2])
def test_snapshot_writes_zstd_parquet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, coalesce: int
) -> None:
    monkeypatch.setattr(eventlog, "COALESCE_FRAMES", coalesce)
    config = EventLogConfig(segment_max_records=8)
    with EventLog(tmp_path / "log", config) as log:
        expected = append_frames(log, [5, 5, 5], seed=15)
        path, upto = log.snapshot(tmp_path / "snaps")
        assert (path, upto) == (tmp_path / "snaps" / f"{15:020d}.parquet", 15)
        log.append(make_records(2, seed=16))
        named, upto2 = log.snapshot(tmp_path / "named.parquet")
        assert (named, upto2) == (tmp_path / "named.parquet", 17)
    table = pq.read_table(path)
    assert table.to_pylist() == expected
    assert table.schema.field("offset").nullable is False
    meta = pq.ParquetFile(path).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert pq.read_table(named).to_pylist() == expected + with_offsets(make_records(2, seed=16), 15)
    assert not list(tmp_path.rglob("*.tmp"))


def test_forget_user_erases_events_across_segments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(eventlog, "COALESCE_FRAMES", 2)  # disk reads merge frames with gaps
    config = EventLogConfig(segment_max_records=6)
    log = EventLog(tmp_path, config)
    expected = append_frames(log, [4, 4, 4, 4], seed=17)
    for frame in (
        [event_record(user_id="bob", item_id="secret0", type="view", ts=9.0)],
        [user_delete_record("bob", ts=10.0)],
        # bob's events are the newest frame: once erased, its offsets must still not be reused
        [event_record(user_id="bob", item_id=f"secret{i}", type="view", ts=11.0) for i in (1, 2)],
    ):
        first, _ = log.append(frame)
        expected += with_offsets(frame, first)
    next_offset = log.next_offset
    kept = [r for r in expected if not (r["kind"] == "event" and r["user_id"] == "bob")]
    removed = len(expected) - len(kept)
    assert removed > 4 and len(segments(tmp_path)) >= 3

    assert log.forget_user("bob") == removed
    assert log.read() == kept  # served by the tail cache
    assert log.next_offset == next_offset
    assert log.forget_user("bob") == 0
    assert log.append(make_records(1, seed=18)) == (next_offset, next_offset)
    kept += with_offsets(make_records(1, seed=18), next_offset)
    log.close()

    with EventLog(tmp_path, config) as log:
        assert log.read() == kept  # served from disk
        assert log.next_offset == next_offset + 1
        assert [r for r in log.read() if r["kind"] == "user_delete"] == [
            r for r in kept if r["kind"] == "user_delete"
        ]
    assert all(b"secret" not in p.read_bytes() for p in segments(tmp_path))
    assert not list(tmp_path.glob("*.tmp"))


def test_invalid_records_write_nothing(tmp_path: Path) -> None:
    with EventLog(tmp_path) as log:
        log.append(make_records(2, seed=19))
        seg = segments(tmp_path)[0]
        size = seg.stat().st_size
        good = make_records(1, seed=20)[0]
        bad_batches = [
            [],
            [good, {**good, "colour": "red"}],
            [good, {**good, "offset": 7}],
            [good, {**good, "value": "high"}],
            [good, {**good, "context": {"device": "ios"}}],
            [good, ["not", "a", "dict"]],
        ]
        for batch in bad_batches:
            with pytest.raises(ValueError):
                log.append(batch)
        assert seg.stat().st_size == size
        assert log.next_offset == 2
        assert log.append([good]) == (2, 2)
    log.close()
    with pytest.raises(ValueError, match="closed"):
        log.append([good])


def test_failed_fsync_cuts_the_frame_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with EventLog(tmp_path) as log:
        expected = append_frames(log, [3], seed=21)
        seg = segments(tmp_path)[0]
        size = seg.stat().st_size

        def failing_fsync(fd: int) -> None:
            raise OSError("disk on fire")

        monkeypatch.setattr(os, "fsync", failing_fsync)
        with pytest.raises(OSError, match="disk on fire"):
            log.append(make_records(4, seed=22))
        monkeypatch.undo()
        assert seg.stat().st_size == size
        assert log.next_offset == 3
        assert log.read() == expected
        assert log.append(make_records(2, seed=23)) == (3, 4)
        expected += with_offsets(make_records(2, seed=23), 3)
    with EventLog(tmp_path) as log:
        assert log.recovered_bytes_cut == 0
        assert log.read() == expected


def test_concurrent_readers_see_only_whole_frames(tmp_path: Path) -> None:
    with EventLog(tmp_path, EventLogConfig(segment_max_records=40, tail_cache_records=30)) as log:
        done = threading.Event()

        def write() -> None:
            try:
                for k in range(150):
                    log.append(make_records(5, seed=k))
            finally:
                done.set()

        writer = threading.Thread(target=write)
        writer.start()
        seen = 0
        while not done.is_set() or seen < 750:
            offsets = [r["offset"] for r in log.read(0)]
            assert len(offsets) % 5 == 0 and offsets == list(range(len(offsets)))
            tail = [r["offset"] for r in log.read(max(len(offsets) - 10, 0))]
            assert tail == list(
                range(max(len(offsets) - 10, 0), max(len(offsets) - 10, 0) + len(tail))
            )
            assert len(tail) % 5 == 0
            seen = len(offsets)
        writer.join()


CRASH_CHILD = """
import sys
from rec.config import EventLogConfig
from rec.eventlog import EventLog

log = EventLog(sys.argv[1], EventLogConfig(segment_max_records=50, tail_cache_records=20))
while True:
    n = log.next_offset
    records = [
        {"kind": "event", "user_id": f"frame{n}", "item_id": f"i{j}", "type": "view", "ts": float(n)}
        for j in range(7)
    ]
    first, last = log.append(records)
    print(last, flush=True)
"""


def test_sigkill_loses_no_acknowledged_append(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    acked: list[int] = []
    for kill_after in (5, 17, 30):
        proc = subprocess.Popen(
            [sys.executable, "-c", CRASH_CHILD, str(tmp_path)],
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        assert proc.stdout is not None
        for count, line in enumerate(proc.stdout, start=1):
            acked.append(int(line))
            if count == kill_after:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL

        with EventLog(tmp_path) as log:
            records = log.read()
        offsets = [r["offset"] for r in records]
        assert offsets == list(range(len(offsets)))  # strictly increasing, no duplicates, no gaps
        assert set(acked) <= set(offsets)
        assert len(offsets) % 7 == 0  # whole frames only
        frames = [records[i : i + 7] for i in range(0, len(records), 7)]
        assert all({r["user_id"] for r in f} == {f"frame{f[0]['offset']}"} for f in frames)
    assert acked == sorted(acked) and len(set(acked)) == len(acked)


def test_the_writer_remembers_the_newest_tokens_kept(tmp_path):
    """Memory for tokens is bounded by eventlog.tokens_kept: a retry of one of the newest is
    still answered with its first offsets; the oldest are forgotten while the writer runs."""
    log = EventLog(tmp_path, EventLogConfig(tokens_kept=3))
    spans = [log.append(make_records(1, 1), token=f"t{i}") for i in range(5)]
    assert log.append(make_records(1, 1), token="t4") == spans[4]  # among the newest 3
    assert log.append(make_records(1, 1), token="t0") == (5, 5)  # forgotten: written again
    assert len(log._tokens) == 3
    log.close()


def test_an_append_retried_with_its_token_is_written_once(tmp_path):
    """A writer that died after the fsync but before answering gets the same call again from
    Ray (max_task_retries): its token makes the retry answer the first offsets, written once,
    also after a reopen (the tokens live in the frames' metadata)."""
    log = EventLog(tmp_path)
    first = log.append(make_records(3, 1), token="t1")
    assert log.append(make_records(3, 1), token="t1") == first == (0, 2)
    # a group commit holding a retry, a new call and the same new call twice
    spans = log.append_groups(
        [("t1", make_records(3, 1)), ("t2", make_records(2, 2)), ("t2", make_records(2, 2))]
    )
    assert spans == [(0, 2, False), (3, 4, True), (3, 4, False)]
    assert log.append(make_records(1, 3)) == (5, 5)  # no token: always written
    log.close()
    with EventLog(tmp_path) as again:
        assert again.append(make_records(2, 2), token="t2") == (3, 4)
        assert again.next_offset == 6 and len(again.read()) == 6
        # a rewrite (erasure) keeps the tokens of the frames it rewrites
        again.forget_user(USERS[0])
    with EventLog(tmp_path) as after:
        assert after.append(make_records(3, 1), token="t1") == (0, 2)
        assert after.next_offset == 6


def test_sealed_segments_keep_only_the_newest_used_indexes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot reads every segment; only SEALED_INDEXES_KEPT sealed indexes stay in memory
    afterwards, and a segment whose index was dropped reads the same again."""
    monkeypatch.setattr(eventlog, "SEALED_INDEXES_KEPT", 2)
    config = EventLogConfig(segment_max_records=4, tail_cache_records=1)
    with EventLog(tmp_path, config) as log:
        expected = append_frames(log, [1] * 30, seed=40)
        assert len(segments(tmp_path)) >= 7
        assert sum(s.frames is not None for s in log._segments[:-1]) == 2  # sealed by rolls
        path, _ = log.snapshot(tmp_path / "snaps")
        assert pq.read_table(path).to_pylist() == expected
        held = [s.frames is not None for s in log._segments]
        assert held[-1] and sum(held[:-1]) == 2 and held[-3] and held[-2]  # the last two read
        for start in (0, 5, 13, 29):
            assert log.read(start, 3) == expected[start : start + 3]
        # the two sealed segments read last: offsets 4.. (read from 5) and 12.. (from 13)
        assert [s.first for s in log._segments[:-1] if s.frames is not None] == [4, 12]
    with EventLog(tmp_path, config) as reopened:  # every sealed index dropped: rescanned
        assert reopened.read() == expected


def test_frame_index_derives_sizes_and_last_offsets(tmp_path: Path) -> None:
    frames = eventlog._Frames()
    for f in (eventlog._Frame(0, 10, 5, 7), eventlog._Frame(10, 4, 8, 8)):
        frames.append(f)
    frames.append(eventlog._Frame(14, 6, 9, 12))
    assert list(frames) == [
        eventlog._Frame(0, 10, 5, 7),
        eventlog._Frame(10, 4, 8, 8),
        eventlog._Frame(14, 6, 9, 12),
    ]
    assert frames[-1] == eventlog._Frame(14, 6, 9, 12) and len(frames) == 3
    with pytest.raises(IndexError):
        frames[3]
    with pytest.raises(ValueError, match="does not follow"):
        frames.append(eventlog._Frame(21, 1, 13, 13))  # a gap in the file
    with pytest.raises(ValueError, match="does not follow"):
        frames.append(eventlog._Frame(20, 1, 14, 14))  # a gap in the offsets
