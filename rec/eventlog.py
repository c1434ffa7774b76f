"""Append-only, durable event log on local disk: framed Arrow IPC segments, one writer.

Why its own framing: every frame carries its length and a CRC32 of its body, so a write torn by a
crash is always detectable at the end of the newest segment and is cut on open; readers only ever
see whole frames. One `append` is one frame and one fsync (the group-commit unit).

Each frame also records its offset range in its Arrow schema metadata. Offsets are therefore
never reused, even after `forget_user` removes rows (a frame keeps its range, possibly with no
rows left), and the next offset survives a reopen.

Segment files are named `{first_offset:020d}.seg`; a frame is
`MAGIC | length (uint32 LE) | crc32 (uint32 LE) | body`, the body a complete Arrow IPC stream
(schema + one record batch + EOS).
"""

from __future__ import annotations

import bisect
import json
import os
import struct
import threading
import time
import zlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rec.config import EventLogConfig
from rec.events import KIND_EVENT, KIND_IMPRESSION
from rec.memory import release_memory

RECORD_FIELDS = (
    "kind",
    "user_id",
    "item_id",
    "type",
    "value",
    "ts",
    "context",
    "request_id",
    "payload",
)
_FLOAT_FIELDS = frozenset({"value", "ts"})
_FIELD_SET = frozenset(RECORD_FIELDS)

SCHEMA = pa.schema(
    [pa.field("offset", pa.int64(), nullable=False)]
    + [pa.field(k, pa.float64() if k in _FLOAT_FIELDS else pa.string()) for k in RECORD_FIELDS]
)
_VALUE_SCHEMA = pa.schema(list(SCHEMA)[1:])

MAGIC = b"RECF"
_HEADER = struct.Struct("<4sII")
_MAX_BODY = 0xFFFFFFFF
_META_FIRST = b"rec.first"
_META_LAST = b"rec.last"
_META_TOKENS = b"rec.tokens"
_READ_BUFFER = 1 << 20
# The tail cache merges each run of this many newest frames into one batch: a frame of a few
# records costs kilobytes of per-batch bookkeeping in memory, whatever its rows (the soak,
# docs/benchmarks.md), so a cache of small group commits would grow with frames, not records.
TAIL_MERGE_FRAMES = 64
SNAPSHOT_ROWS = 1 << 16  # a snapshot holds at most about this many rows in memory at once
# Frames decoded from disk are merged in runs of up to this many (or COALESCE_ROWS rows)
# before they are kept: a frame's batch holds its whole IPC body and Arrow's per-batch
# bookkeeping, kilobytes whatever its rows, so a read or snapshot of small group commits that
# kept them apart would peak at kilobytes per record (docs/operations.md, memory).
COALESCE_FRAMES = 256
COALESCE_ROWS = 1 << 14
# Sealed segments whose frame index stays in memory after a read (the most recently used):
# a snapshot reads every segment, and keeping every index would grow with the whole log.
SEALED_INDEXES_KEPT = 2
_BEHAVIOUR = pa.array([KIND_EVENT, KIND_IMPRESSION])


class CorruptLogError(Exception):
    """The log is damaged somewhere other than a torn tail, so it cannot be repaired by a cut."""


@dataclass(slots=True)
class _Frame:
    """Where a frame sits in its segment file and which offsets it covers."""

    pos: int
    size: int
    first: int
    last: int


class _Frames:
    """A segment's frame index: each frame's position and first offset, in two int64 arrays
    (16 bytes a frame; a `_Frame` object each would cost ~240). Frames are contiguous on both
    counts (each starts where the one before it ends, at the offset after its last), so a
    frame's size and last offset are where the next one starts, or the index's end. With small
    group commits a segment holds about one frame per record: this index grows with the
    segment, up to `segment_max_records` frames."""

    __slots__ = ("_pos", "_first", "_end", "_next")

    def __init__(self) -> None:
        self._pos, self._first = array("q"), array("q")
        self._end = 0  # byte after the last frame
        self._next = 0  # offset after the last frame

    def append(self, frame: _Frame) -> None:
        if self._pos and (frame.pos != self._end or frame.first != self._next):
            raise ValueError(f"frame {frame} does not follow the index's last one")
        self._pos.append(frame.pos)
        self._first.append(frame.first)
        self._end, self._next = frame.pos + frame.size, frame.last + 1

    def __len__(self) -> int:
        return len(self._pos)

    def __getitem__(self, i: int) -> _Frame:
        n = len(self._pos)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("frame index out of range")
        end, nxt = (self._pos[i + 1], self._first[i + 1]) if i + 1 < n else (self._end, self._next)
        return _Frame(self._pos[i], end - self._pos[i], self._first[i], nxt - 1)

    def __iter__(self) -> Iterator[_Frame]:
        return self.since(0)

    def since(self, j: int) -> Iterator[_Frame]:
        """The frames from the j-th on (no copy of the columns: reads start anywhere)."""
        return (self[k] for k in range(j, len(self)))


@dataclass(slots=True)
class _Segment:
    first: int
    path: Path
    frames: _Frames | None = None  # None: a sealed segment not scanned yet


@dataclass(slots=True)
class _Cached:
    first: int
    last: int
    batch: pa.RecordBatch


class EventLog:
    """Durable append-only log with offsets, a tail cache, Parquet snapshots and user erasure.

    Thread-safety: `_write_lock` guards the files and the segment index (appends, disk reads,
    snapshots, erasure); `_state_lock` guards the published tail cache, so reads served from the
    cache never wait for an fsync.
    """

    def __init__(self, path: str | Path, config: EventLogConfig | None = None) -> None:
        self.path = Path(path)
        self.config = config or EventLogConfig()
        self.path.mkdir(parents=True, exist_ok=True)
        self._write_lock = threading.Lock()
        self._state_lock = threading.Lock()
        for stale in self.path.glob("*.tmp"):  # an erasure or snapshot that never got replaced in
            stale.unlink()
        self._segments = [_Segment(int(p.stem), p) for p in sorted(self.path.glob("*.seg"))]
        if not self._segments:
            self._segments.append(_Segment(0, self._segment_path(0), _Frames()))
            self._segments[0].path.touch()
            _fsync_dir(self.path)
        active = self._segments[-1]
        self._tokens: OrderedDict[str, tuple[int, int]] = OrderedDict()
        found: dict[str, tuple[int, int]] = {}
        self.recovered_bytes_cut: int = _recover(active, found)
        self._remember(found)
        assert active.frames is not None
        self._next_offset = active.frames[-1].last + 1 if active.frames else active.first
        self._active_size = active.frames[-1].pos + active.frames[-1].size if active.frames else 0
        self._file = open(active.path, "ab", buffering=0)  # noqa: SIM115 - lives until close()
        self._tail: deque[_Cached] = deque()
        self._tail_rows = 0
        self._tail_unmerged = 0  # newest frames in the cache not merged yet
        self._tail_start = self._next_offset
        self._expired: set[int] = set()  # first offsets of segments with no behaviour records
        self._indexed: OrderedDict[int, _Segment] = OrderedDict()  # sealed, index held; LRU
        self._closed = False

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def next_offset(self) -> int:
        """Offset the next appended record gets."""
        return self._next_offset

    def append(self, records: list[dict[str, Any]], token: str | None = None) -> tuple[int, int]:
        """Append `records` as one fsynced frame; returns (first, last) offsets, last inclusive.

        Missing keys are stored as None; unknown keys or values of the wrong type raise
        ValueError before anything is written. If the write or fsync fails the file is cut back,
        so nothing half-written stays and `next_offset` is unchanged. An append with a `token`
        already written returns the offsets it got then and writes nothing (`append_groups`).
        """
        first, last, _ = self.append_groups([(token, records)])[0]
        return first, last

    def append_groups(
        self, groups: list[tuple[str | None, list[dict[str, Any]]]]
    ) -> list[tuple[int, int, bool]]:
        """Append several callers' records as one fsynced frame (the log actor's group
        commit); per group (first, last, written).

        A group whose token was written before (a caller's retry after its acknowledgement was
        lost: the writer died after the fsync) is not written again: it gets the offsets it
        got then and written=False. Tokens are kept in the frame's metadata, so the writer
        that restarts knows those of the active segment again, and the newest
        `config.tokens_kept` in memory while it runs.
        """
        if not groups or any(not records for _, records in groups):
            raise ValueError("append needs at least one record")
        with self._write_lock:
            self._check_open()
            first = self._next_offset
            out: list[tuple[int, int, bool] | None] = []
            fresh: list[dict[str, Any]] = []
            tokens: dict[str, tuple[int, int]] = {}
            for token, records in groups:
                known = self._tokens.get(token) or tokens.get(token) if token else None
                if known is not None:
                    out.append((*known, False))
                    continue
                span = (first + len(fresh), first + len(fresh) + len(records) - 1)
                if token:
                    tokens[token] = span
                fresh += records
                out.append((*span, True))
            if not fresh:
                return out
            last = first + len(fresh) - 1
            batch = _to_batch(fresh, first)
            frame = _encode(first, last, batch, tokens)
            if first - self._segments[-1].first >= self.config.segment_max_records:
                self._roll()
            pos = self._active_size
            try:
                _write_all(self._file, frame)
                os.fsync(self._file.fileno())
            except BaseException:
                # No fsync needed after the cut: a partial frame that reaches disk is a torn tail.
                self._file.truncate(pos)
                raise
            frames = self._segments[-1].frames
            assert frames is not None
            frames.append(_Frame(pos, len(frame), first, last))
            self._active_size = pos + len(frame)
            self._remember(tokens)
            with self._state_lock:
                self._next_offset = last + 1
                self._cache(_Cached(first, last, batch))
        return out

    def read(self, start: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        """Records with offset >= start in offset order (at most `limit`), each with "offset"."""
        return pa.Table.from_batches(self._batches(start, None, limit), SCHEMA).to_pylist()

    def table(self, start: int = 0, end: int | None = None) -> pa.Table:
        """Records with start <= offset < end (end None: to the newest) as a SCHEMA table."""
        return pa.Table.from_batches(self._batches(start, end, None), SCHEMA)

    def snapshot(self, dest: str | Path) -> tuple[Path, int]:
        """Write everything in the log now to one zstd Parquet file, atomically.

        `dest` ending in ".parquet" is the file itself; otherwise it is a directory and the file
        is named after the offset it runs up to. Returns (path, next_offset at the snapshot).
        Appends wait while the snapshot is written, so it is exactly the log up to that offset.
        """
        dest = Path(dest)
        with self._write_lock:
            self._check_open()
            upto = self._next_offset
            target = dest if dest.suffix == ".parquet" else dest / f"{upto:020d}.parquet"
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".tmp")
            try:
                with pq.ParquetWriter(tmp, SCHEMA, compression="zstd") as writer:
                    chunk: list[pa.RecordBatch] = []
                    rows = 0
                    for idx in range(len(self._segments)):
                        for _, batch in self._segment_batches(idx, 0, None):
                            if batch.num_rows:
                                chunk.append(batch)
                                rows += batch.num_rows
                            if rows >= SNAPSHOT_ROWS:
                                writer.write_batch(pa.concat_batches(chunk))
                                chunk, rows = [], 0
                    if chunk:
                        writer.write_batch(pa.concat_batches(chunk))
                _fsync_file(tmp)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            os.replace(tmp, target)
            _fsync_dir(target.parent)
        release_memory()
        return target, upto

    def forget_user(self, user_id: str) -> int:
        """Physically erase every "event" record of `user_id`; returns how many were removed.

        Each affected segment is rewritten to a temporary file, fsynced and renamed over the old
        one. Other records keep their offsets; frames keep their offset ranges. Records of other
        kinds (notably the user_delete tombstone followers need) are kept.
        """
        needle = user_id.encode()
        removed = 0
        with self._write_lock:
            self._check_open()
            for idx, seg in enumerate(self._segments):
                data = seg.path.read_bytes()
                if needle in data:  # bodies are uncompressed Arrow, so strings appear as is
                    removed += self._rewrite(idx, lambda b: _of_user(b, user_id), data, needle)
            if removed:
                self._filter_tail(lambda b: _of_user(b, user_id))
        release_memory()  # every segment was read
        return removed

    def expire(self, protect_from: int, now: float | None = None) -> dict[str, Any]:
        """Apply the retention policy: in sealed segments wholly below `protect_from` (what the
        oldest live-state checkpoint holds), remove the behaviour records (events and
        impressions) of a segment whose newest event time is older than
        `retention_max_age_s`, and of the oldest segments while the log is larger than
        `retention_max_bytes`. Catalogue records and tombstones stay, so the catalogue is
        rebuilt whole by replay; offsets and frame ranges never change. The active segment and
        anything at or above `protect_from` are never touched."""
        cfg = self.config
        age, budget = cfg.retention_max_age_s, cfg.retention_max_bytes
        out: dict[str, Any] = {"expired_records": 0, "segments": [], "ranges": []}
        if age is None and budget is None:
            return out
        cutoff = (time.time() if now is None else now) - (age or 0.0)
        with self._write_lock:
            self._check_open()
            total = sum(seg.path.stat().st_size for seg in self._segments)
            for idx in range(len(self._segments) - 1):
                seg, nxt = self._segments[idx], self._segments[idx + 1]
                if nxt.first > protect_from:
                    break
                if seg.first in self._expired:
                    continue
                newest = self._newest_ts(idx)
                if newest is None:  # no behaviour records left
                    self._expired.add(seg.first)
                    continue
                too_old = age is not None and newest < cutoff
                too_big = budget is not None and total > budget
                if not (too_old or too_big):
                    continue
                size = seg.path.stat().st_size
                out["expired_records"] += self._rewrite(idx, _behaviour)
                self._expired.add(seg.first)
                total -= size - seg.path.stat().st_size
                out["segments"].append(seg.path.name)
                out["ranges"].append((seg.first, nxt.first))
            if out["expired_records"]:
                self._filter_tail(_behaviour, out["ranges"])
        if out["segments"]:
            release_memory()
        out["bytes"] = total
        out["over_budget"] = budget is not None and total > budget
        return out

    def close(self) -> None:
        """Close the append handle; the log can be reopened by a new EventLog."""
        with self._write_lock:
            if not self._closed:
                self._file.close()
                self._closed = True

    # -- internals ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"event log {self.path} is closed")

    def _segment_path(self, first: int) -> Path:
        return self.path / f"{first:020d}.seg"

    def _roll(self) -> None:
        """Start a new segment at next_offset; the directory is fsynced so the file survives."""
        seg = _Segment(self._next_offset, self._segment_path(self._next_offset), _Frames())
        new_file = open(seg.path, "ab", buffering=0)  # noqa: SIM115
        self._file.close()
        self._file = new_file
        self._kept(self._segments[-1])  # sealed now, its index in memory
        self._segments.append(seg)
        self._active_size = 0
        _fsync_dir(self.path)

    def _remember(self, tokens: dict[str, tuple[int, int]]) -> None:
        self._tokens.update(tokens)
        while len(self._tokens) > self.config.tokens_kept:
            self._tokens.popitem(last=False)

    def _rewrite(
        self,
        idx: int,
        drop,
        data: bytes | None = None,
        needle: bytes | None = None,
    ) -> int:
        """Rewrite segment `idx` without the rows `drop(batch)` masks (only frames holding
        `needle` are decoded, given one): a temporary file, fsynced, renamed over the segment.
        Frames keep their offset ranges. Returns the rows removed. Holds the write lock."""
        seg = self._segments[idx]
        data = seg.path.read_bytes() if data is None else data
        out = bytearray()
        frames = _Frames()
        removed = 0
        for fr in self._frames(idx):
            raw: bytes | memoryview = memoryview(data)[fr.pos : fr.pos + fr.size]
            body = _valid_body(raw, 0)
            if body is None:
                raise CorruptLogError(f"{seg.path}: bad frame at byte {fr.pos}")
            if needle is None or data.find(needle, fr.pos, fr.pos + fr.size) != -1:
                batch = _read_batch(body)
                kept = batch.filter(pc.invert(drop(batch)))
                if kept.num_rows < batch.num_rows:
                    removed += batch.num_rows - kept.num_rows
                    raw = _encode(fr.first, fr.last, kept, _frame_meta(body)[2])
            frames.append(_Frame(len(out), len(raw), fr.first, fr.last))
            out += raw
        if not removed:
            return 0
        tmp = seg.path.with_name(seg.path.name + ".tmp")
        tmp.write_bytes(out)
        _fsync_file(tmp)
        os.replace(tmp, seg.path)
        _fsync_dir(self.path)
        seg.frames = frames
        if idx == len(self._segments) - 1:  # the append handle points at the old file
            self._file.close()
            self._file = open(seg.path, "ab", buffering=0)  # noqa: SIM115
            self._active_size = len(out)
        return removed

    def _filter_tail(self, drop, ranges: list[tuple[int, int]] | None = None) -> None:
        """Drop from the tail cache the rows `drop` masks (only those with offsets inside the
        ranges [first, end) given, else all)."""

        def kept(c: _Cached) -> _Cached:
            if ranges is not None and not any(c.first < hi and lo <= c.last for lo, hi in ranges):
                return c
            mask = drop(c.batch)
            if ranges is not None:
                mask = pc.and_(mask, _in_ranges(c.batch.column(0), ranges))
            return _Cached(c.first, c.last, c.batch.filter(pc.invert(mask)))

        with self._state_lock:
            self._tail = deque(kept(c) for c in self._tail)
            self._tail_rows = sum(c.batch.num_rows for c in self._tail)

    def _newest_ts(self, idx: int) -> float | None:
        """The newest event time of segment `idx`'s behaviour records (None: it has none)."""
        newest = None
        for _, batch in self._segment_batches(idx, 0, None):
            ts = pc.max(batch["ts"].filter(_behaviour(batch))).as_py()
            if ts is not None and (newest is None or ts > newest):
                newest = ts
        return newest

    def _cache(self, item: _Cached) -> None:
        """Add a committed frame to the tail cache, merging each TAIL_MERGE_FRAMES newest
        frames into one batch, and evicting whole old batches beyond the cap."""
        self._tail.append(item)
        self._tail_rows += item.batch.num_rows
        self._tail_unmerged += 1
        if self._tail_unmerged >= TAIL_MERGE_FRAMES:
            run = [self._tail.pop() for _ in range(self._tail_unmerged)][::-1]
            merged = pa.concat_batches([c.batch for c in run])
            self._tail.append(_Cached(run[0].first, run[-1].last, merged))
            self._tail_unmerged = 0
        while self._tail and self._tail_rows > self.config.tail_cache_records:
            self._tail_rows -= self._tail.popleft().batch.num_rows
        self._tail_unmerged = min(self._tail_unmerged, len(self._tail))
        self._tail_start = self._tail[0].first if self._tail else self._next_offset

    def _batches(self, start: int, end: int | None, limit: int | None) -> list[pa.RecordBatch]:
        """Batches of records in [start, end), at most `limit` rows: from the cache if it covers
        `start`, else from disk."""
        if limit is not None and limit < 0:
            raise ValueError("limit must be >= 0")
        self._check_open()
        picked: list[_Cached] = []
        with self._state_lock:
            cached = start >= self._tail_start
            if cached:
                for c in reversed(self._tail):
                    if c.last < start:
                        break
                    picked.append(c)
        if cached:
            return _clip(((c.first, c.batch) for c in reversed(picked)), start, end, limit)
        with self._write_lock:
            first_seg = max(bisect.bisect_right([s.first for s in self._segments], start) - 1, 0)
            rows = COALESCE_ROWS if limit is None else max(min(COALESCE_ROWS, limit), 1)
            frames = (
                frame
                for idx in range(first_seg, len(self._segments))
                for frame in self._segment_batches(idx, start, end, rows)
            )
            return _clip(frames, start, end, limit)

    def _segment_batches(
        self, idx: int, start: int, end: int | None, max_rows: int = COALESCE_ROWS
    ) -> Iterator[tuple[int, pa.RecordBatch]]:
        """(first offset, batch) of the frames of segment `idx` that overlap [start, end),
        consecutive frames merged into one batch each COALESCE_FRAMES frames or `max_rows`
        rows as they are decoded, so that few small batches are alive at once (a read of
        `limit` rows passes it as max_rows: it decodes no more frames than it needs)."""
        frames = self._frames(idx)
        j = bisect.bisect_left(frames, start, key=lambda f: f.last)
        if j == len(frames) or (end is not None and frames[j].first >= end):
            return
        path = self._segments[idx].path
        run: list[pa.RecordBatch] = []
        run_first = rows = 0
        with open(path, "rb", buffering=_READ_BUFFER) as fh:
            fh.seek(frames[j].pos)
            for fr in frames.since(j):
                if end is not None and fr.first >= end:
                    break
                body = _valid_body(fh.read(fr.size), 0)
                if body is None:
                    raise CorruptLogError(f"{path}: bad frame at byte {fr.pos}")
                if not run:
                    run_first = fr.first
                run.append(_read_batch(body))
                rows += run[-1].num_rows
                if len(run) >= COALESCE_FRAMES or rows >= max_rows:
                    yield run_first, _merged(run)
                    run, rows = [], 0
        if run:
            yield run_first, _merged(run)

    def _frames(self, idx: int) -> _Frames:
        """The frame index of segment `idx`. A sealed segment is scanned strictly on first use
        and its index kept while it is among the SEALED_INDEXES_KEPT most recently used."""
        seg = self._segments[idx]
        if idx == len(self._segments) - 1:
            assert seg.frames is not None  # the active segment's index lives while it is written
            return seg.frames
        if seg.frames is None:
            data = seg.path.read_bytes()
            frames, good = _scan(data, seg.first, seg.path)
            if good != len(data):
                raise CorruptLogError(f"{seg.path}: bad frame at byte {good} of a sealed segment")
            end = frames[-1].last + 1 if frames else seg.first
            following = self._segments[idx + 1].first
            if end != following:
                raise CorruptLogError(
                    f"{seg.path} ends at offset {end} but the next segment starts at {following}"
                )
            seg.frames = frames
        self._kept(seg)
        return seg.frames

    def _kept(self, seg: _Segment) -> None:
        """Mark a sealed segment's index as just used; drop the least recently used beyond
        SEALED_INDEXES_KEPT (a reader iterating one holds its own reference)."""
        self._indexed[seg.first] = seg
        self._indexed.move_to_end(seg.first)
        while len(self._indexed) > SEALED_INDEXES_KEPT:
            self._indexed.popitem(last=False)[1].frames = None


# -- frames --------------------------------------------------------------------------------


def _to_batch(records: list[dict[str, Any]], first: int) -> pa.RecordBatch:
    """Records in log format -> a SCHEMA batch with offsets from `first`; ValueError if bad."""
    if not all(isinstance(r, dict) and r.keys() <= _FIELD_SET for r in records):
        bad = next(r for r in records if not (isinstance(r, dict) and r.keys() <= _FIELD_SET))
        if not isinstance(bad, dict):
            raise ValueError(f"a record must be a dict, got {type(bad).__name__}")
        raise ValueError(f"unknown record keys: {sorted(bad.keys() - _FIELD_SET)}")
    try:
        values = pa.RecordBatch.from_pylist(records, schema=_VALUE_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ValueError(f"bad record value: {exc}") from exc
    offsets = pa.array(np.arange(first, first + len(records), dtype=np.int64))
    return pa.RecordBatch.from_arrays([offsets, *values.columns], schema=SCHEMA)


def _encode(
    first: int, last: int, batch: pa.RecordBatch, tokens: dict[str, tuple[int, int]] | None = None
) -> bytes:
    """One frame: header + an Arrow IPC stream whose schema metadata holds the offset range
    (and the append tokens it holds, with their offsets)."""
    meta = {_META_FIRST: str(first).encode(), _META_LAST: str(last).encode()}
    if tokens:
        meta[_META_TOKENS] = json.dumps(tokens, separators=(",", ":")).encode()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, SCHEMA.with_metadata(meta)) as writer:
        writer.write_batch(batch)
    body = sink.getvalue()
    if body.size > _MAX_BODY:
        raise ValueError(f"frame of {body.size} bytes is too large")
    return _HEADER.pack(MAGIC, body.size, zlib.crc32(body)) + body.to_pybytes()


def _valid_body(data: bytes | memoryview, pos: int) -> memoryview | None:
    """The body of the frame at `pos` if it is whole and its checksum matches, else None."""
    if len(data) - pos < _HEADER.size:
        return None
    magic, length, crc = _HEADER.unpack_from(data, pos)
    start = pos + _HEADER.size
    if magic != MAGIC or start + length > len(data):
        return None
    body = memoryview(data)[start : start + length]
    return body if zlib.crc32(body) == crc else None


def _open_body(body: memoryview) -> pa.ipc.RecordBatchStreamReader:
    try:
        return pa.ipc.open_stream(pa.py_buffer(body))
    except pa.ArrowInvalid as exc:  # checksum matched, so this is not a torn write
        raise CorruptLogError(f"undecodable frame body: {exc}") from exc


def _read_batch(body: memoryview) -> pa.RecordBatch:
    try:
        batch = _open_body(body).read_next_batch()
    except (pa.ArrowInvalid, StopIteration) as exc:
        raise CorruptLogError(f"undecodable frame body: {exc}") from exc
    return batch.replace_schema_metadata(None)


def _frame_meta(body: memoryview) -> tuple[int, int, dict[str, tuple[int, int]]]:
    """A frame's offset range and append tokens."""
    meta = _open_body(body).schema.metadata or {}
    try:
        first, last = int(meta[_META_FIRST]), int(meta[_META_LAST])
        tokens = json.loads(meta[_META_TOKENS]) if _META_TOKENS in meta else {}
    except (KeyError, ValueError) as exc:
        raise CorruptLogError("frame without an offset range") from exc
    return first, last, {t: (int(a), int(b)) for t, (a, b) in tokens.items()}


def _scan(data: bytes, first: int, path: Path, tokens: dict | None = None) -> tuple[_Frames, int]:
    """Index the leading run of valid frames of a segment; returns them and where they end
    (and adds their append tokens to `tokens`, given one).

    Frames must cover consecutive offsets starting at the segment's first offset.
    """
    frames = _Frames()
    pos = 0
    expected = first
    while (body := _valid_body(data, pos)) is not None:
        f_first, f_last, f_tokens = _frame_meta(body)
        if tokens is not None:
            tokens.update(f_tokens)
        if f_first != expected or f_last < f_first:
            raise CorruptLogError(
                f"{path}: frame at byte {pos} covers {f_first}..{f_last}, expected {expected}.."
            )
        size = _HEADER.size + len(body)
        frames.append(_Frame(pos, size, f_first, f_last))
        pos += size
        expected = f_last + 1
    return frames, pos


def _recover(seg: _Segment, tokens: dict) -> int:
    """Scan the last segment (its frames' append tokens into `tokens`) and cut a torn tail
    (fsynced); returns the bytes cut.

    Bad bytes after the last good frame are a torn tail only if no valid frame follows them;
    otherwise the damage is in the middle of the log and CorruptLogError is raised.
    """
    data = seg.path.read_bytes()
    seg.frames, good = _scan(data, seg.first, seg.path, tokens)
    if good == len(data):
        return 0
    at = data.find(MAGIC, good + 1)
    while at != -1:
        if _valid_body(data, at) is not None:
            raise CorruptLogError(f"{seg.path}: bad frame at byte {good} followed by valid data")
        at = data.find(MAGIC, at + 1)
    with open(seg.path, "r+b") as fh:
        fh.truncate(good)
        os.fsync(fh.fileno())
    return len(data) - good


def _clip(
    frames: Iterable[tuple[int, pa.RecordBatch]], start: int, end: int | None, limit: int | None
) -> list[pa.RecordBatch]:
    """Slice (first, batch) pairs in offset order to [start, end), at most `limit` rows."""
    out: list[pa.RecordBatch] = []
    taken = 0
    if limit == 0:
        return out
    for first, batch in frames:
        if end is not None and first >= end:
            break
        offsets = batch.column(0).to_numpy()
        lo = int(np.searchsorted(offsets, start))
        hi = len(offsets) if end is None else int(np.searchsorted(offsets, end))
        if limit is not None:
            hi = min(hi, lo + limit - taken)
        if hi > lo:
            out.append(batch.slice(lo, hi - lo))
            taken += hi - lo
            if limit is not None and taken >= limit:
                break
    return out


def _merged(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    return batches[0] if len(batches) == 1 else pa.concat_batches(batches)


def _in_ranges(offsets: pa.Array, ranges: list[tuple[int, int]]) -> pa.Array:
    """Mask of the offsets inside any of the ranges [first, end)."""
    mask = pa.array(np.zeros(len(offsets), dtype=bool))
    for lo, hi in ranges:
        mask = pc.or_(mask, pc.and_(pc.greater_equal(offsets, lo), pc.less(offsets, hi)))
    return mask


def _behaviour(batch: pa.RecordBatch) -> pa.Array:
    """Mask of the rows a retention policy expires: events and impressions."""
    return pc.fill_null(pc.is_in(batch["kind"], _BEHAVIOUR), False)


def _of_user(batch: pa.RecordBatch, user_id: str) -> pa.Array:
    """Mask of the rows that are "event" records of `user_id` (nulls count as no)."""
    mask = pc.and_(pc.equal(batch["kind"], KIND_EVENT), pc.equal(batch["user_id"], user_id))
    return pc.fill_null(mask, False)


# -- files ---------------------------------------------------------------------------------


def _write_all(fh: Any, data: bytes) -> None:
    """Write all of `data` to an unbuffered file (raw writes may be partial)."""
    view = memoryview(data)
    while view:
        view = view[fh.write(view) :]


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    """Make file creations and renames in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
