"""The EventLog actor: the single writer of the durable log, with group commit.

Concurrent appends queue up while one fsync is in flight and go to disk together as one frame;
each caller's call returns only after its records are on disk. Followers (every stateful
replica) read committed records from memory by offset.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import Counter, deque
from pathlib import Path
from types import SimpleNamespace

import ray

from deployments import telemetry
from deployments.runtime import ON_HEAD, actor_options, lower_own_priority
from rec.beacon import HeadWriter, owner
from rec.config import EventLogConfig
from rec.eventlog import EventLog
from rec.events import KIND_EVENT, KIND_IMPRESSION
from rec.push import Change, Watches

LOG_ACTOR = "rec_eventlog"
FORGOTTEN = "forgotten"  # in-memory stand-in for a removed record; followers skip it
BEHAVIOUR = (KIND_EVENT, KIND_IMPRESSION)  # what the retention policy removes
RECENT_DICTS = 20_000
NAMESPACE = "rec"


class EventLogService:
    def __init__(self, path: str, config: dict | None = None) -> None:
        self.config = EventLogConfig.model_validate(config or {})
        self.log = EventLog(Path(path), self.config)
        self.head = HeadWriter(path)
        self.head.publish(self.log.next_offset)
        self.metrics = telemetry.log()
        self.metrics.head.set(self.log.next_offset)
        # The newest records as dicts, for `read` without decoding Arrow; older ones come from
        # the log's Arrow tail cache (tail_cache_records) or disk. Capped apart and lower: a
        # dict costs several times its Arrow row (docs/ray-notes.md, the soak).
        self.recent: deque[dict] = deque(maxlen=min(self.config.tail_cache_records, RECENT_DICTS))
        self.pending: list[tuple[list[dict], asyncio.Future]] = []
        self.watches = Watches(self.log.next_offset)  # ingress replicas pushing to streams
        self.disk = asyncio.Lock()  # one disk operation at a time (append, snapshot, forget)
        self.flushing = False
        # The Ray node this actor runs on (None without Ray: Serve's local testing mode), and
        # per reader node: head_info answers with the ring and without it, and reads served.
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        self.ring_given: Counter[str] = Counter()
        self.ring_refused: Counter[str] = Counter()
        self.reads: Counter[str] = Counter()

    async def append(self, records: list[dict], token: str | None = None) -> tuple[int, int]:
        """Append records durably; returns their (first, last) offsets once fsynced. Callers
        pass a token of their own per call: Ray resends a call whose answer was lost when
        this actor died (max_task_retries), and a token already written is not written again
        (rec.eventlog.EventLog.append_groups)."""
        if not records:
            raise ValueError("no records")
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((records, token, fut))
        if not self.flushing:
            self.flushing = True
            asyncio.get_running_loop().create_task(self._flush())
        return await fut

    async def _flush(self) -> None:
        try:
            while self.pending:
                batch, self.pending = self.pending, []
                try:
                    async with self.disk:
                        spans = await asyncio.to_thread(
                            self.log.append_groups, [(tok, recs) for recs, tok, _ in batch]
                        )
                except Exception as exc:  # nothing was written: every caller in the group fails
                    for _, _, fut in batch:
                        fut.set_exception(exc)
                    continue
                written = [
                    (recs, first)
                    for (recs, _, _), (first, _, new) in zip(batch, spans, strict=True)
                    if new
                ]
                if written:
                    self._published(written)
                for (_, _, fut), (first, last, _) in zip(batch, spans, strict=True):
                    fut.set_result((first, last))
        finally:
            self.flushing = False

    def _published(self, written: list[tuple[list[dict], int]]) -> None:
        """Records just written as one frame (consecutive offsets): into memory for followers,
        and the head moved past them, before any of them is acknowledged."""
        records = [r for recs, _ in written for r in recs]
        first = written[0][1]
        kinds: dict[str, int] = {}
        for r in records:
            kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
        for kind, n in kinds.items():
            self.metrics.records.inc(n, tags={"kind": kind})
        self.metrics.head.set(first + len(records))
        stored = [{**r, "offset": first + i} for i, r in enumerate(records)]
        self.recent.extend(stored)
        self.head.remember(stored)
        self.head.mark(first, [owner(r) for r in records])
        if any(r["kind"] != KIND_IMPRESSION for r in records):
            # impressions alone (training's feedback, which serving does not apply) leave
            # followers where they are
            self.head.publish(first + len(records))
        self.watches.published(stored, first + len(records))

    def next_offset(self) -> int:
        return self.log.next_offset

    async def watch(self, watcher: str, users: list[str], after: int, timeout_s: float) -> Change:
        """Answers when a record from offset `after` on concerns one of `users` or the
        catalogue, or after `timeout_s` with nothing (rec.push.Watches: one pending watch per
        watcher, a newer one replaces it)."""
        return await self.watches.wait(watcher, users, after, self._since(after), timeout_s)

    def recent_users(self, limit: int) -> list[str]:
        """Up to `limit` users with the newest events in memory, newest first."""
        users: dict[str, None] = {}
        for r in reversed(self.recent):
            if r["kind"] == KIND_EVENT:
                users.setdefault(r["user_id"], None)
                if len(users) >= limit:
                    break
        return list(users)

    def _since(self, start: int) -> list[dict] | None:
        """The records from offset `start` to the head, when memory still holds them all."""
        if start >= self.log.next_offset:
            return []
        if not self.recent or self.recent[0]["offset"] > start:
            return None
        out = []
        for r in reversed(self.recent):
            if r["offset"] < start:
                break
            out.append(r)
        return out[::-1]

    def head_info(self, reader_node: str | None = None) -> dict | None:
        """Where replicas on this machine read the head offset without calling this actor.

        A reader that names its Ray node gets it only on this actor's node (None elsewhere: it
        then reads through `read`). On a cluster another node is another machine, which the
        head file's machine check refuses anyway; several Ray nodes on one machine (the
        cluster tests) behave as a cluster would."""
        if reader_node is not None and self.node is not None and reader_node != self.node:
            self.ring_refused[reader_node] += 1
            return None
        self.ring_given[reader_node or "?"] += 1
        return {**self.head.info(), "node": self.node}

    def reader_stats(self) -> dict:
        """This actor's node, and per reader node: head_info answers with the shared ring
        (`ring_given`) and without it (`ring_refused`), and `read` calls served."""
        return {
            "node": self.node,
            "ring_given": dict(self.ring_given),
            "ring_refused": dict(self.ring_refused),
            "reads": dict(self.reads),
        }

    async def read(
        self, start: int, limit: int = 10_000, reader_node: str | None = None
    ) -> list[dict]:
        """Committed records with offset >= start (at most `limit`)."""
        self.reads[reader_node or "?"] += 1
        if self.recent and start >= self.recent[0]["offset"]:
            first = self.recent[0]["offset"]
            out = []
            for i in range(max(start - first, 0), len(self.recent)):
                out.append(self.recent[i])
                if len(out) >= limit:
                    break
            if out or start >= self.log.next_offset:
                return out
        if start >= self.log.next_offset:
            return []
        async with self.disk:
            return await asyncio.to_thread(self.log.read, start, limit)

    async def snapshot(self, dest: str) -> tuple[str, int]:
        """A Parquet copy of the log for training, written by a thread of its own at the lowest
        priority (on Linux niceness is per thread), so appends and reads keep theirs."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def write() -> None:
            lower_own_priority()
            try:
                result = self.log.snapshot(dest)
            except Exception as exc:  # handed to the caller
                loop.call_soon_threadsafe(done.set_exception, exc)
            else:
                loop.call_soon_threadsafe(done.set_result, result)

        async with self.disk:
            threading.Thread(target=write, name="snapshot", daemon=True).start()
            path, offset = await done
        return str(path), offset

    async def forget_user(self, user_id: str) -> int:
        """Remove the user's events from disk and memory (the tombstone record stays)."""
        async with self.disk:
            removed = await asyncio.to_thread(self.log.forget_user, user_id)
        self._forget_in_memory(lambda r: r["kind"] == "event" and r["user_id"] == user_id)
        return removed

    def _forget_in_memory(self, gone) -> None:
        """Replace the records `gone(record)` picks in memory by placeholders (offsets stay
        dense), and wipe the shared ring: followers on this machine read them from here."""
        for i, r in enumerate(self.recent):
            if gone(r):
                self.recent[i] = {"offset": r["offset"], "kind": FORGOTTEN}
        self.head.forget_recent()

    async def expire(self, protect_from: int) -> dict:
        """Apply the log's retention policy below `protect_from` (rec.eventlog.EventLog.expire)
        on disk and in memory."""
        async with self.disk:
            out = await asyncio.to_thread(self.log.expire, protect_from)
        if out["expired_records"]:
            self._forget_in_memory(
                lambda r: (
                    r["kind"] in BEHAVIOUR
                    and any(lo <= r["offset"] < hi for lo, hi in out["ranges"])
                )
            )
        return out

    def recovery(self) -> dict:
        """What opening the log found: bytes of torn tail cut, and where the log stands."""
        return {
            "pid": os.getpid(),
            "bytes_cut": self.log.recovered_bytes_cut,
            "next_offset": self.log.next_offset,
        }


# Calls are retried on the restarted actor when it died before answering: appends carry a
# token, so a retried one is written once; every other method can run twice.
EventLogActor = ray.remote(max_restarts=-1, max_task_retries=-1)(EventLogService)


class LocalHandle:
    """An in-process stand-in for an actor handle (`obj.method.remote(...)` is awaitable from any
    event loop): the object runs on its own loop thread, like an async actor. Used by Serve's
    local testing mode, where there is no Ray."""

    def __init__(self, factory) -> None:
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True, name="local-actor").start()
        self._obj = asyncio.run_coroutine_threadsafe(_construct(factory), self._loop).result()
        self._key = id(self)
        _LOCAL_HANDLES[self._key] = self

    def __reduce__(self):  # Serve pickles init args even in local mode: same process, same object
        return _local_handle, (self._key,)

    def __getattr__(self, name: str):
        method = getattr(self._obj, name)
        loop = self._loop

        class _Remote:
            @staticmethod
            def remote(*args, **kwargs):
                async def call():
                    out = method(*args, **kwargs)
                    return await out if asyncio.iscoroutine(out) else out

                return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call(), loop))

        return _Remote

    def close(self) -> None:
        _LOCAL_HANDLES.pop(self._key, None)
        self._loop.call_soon_threadsafe(self._loop.stop)


_LOCAL_HANDLES: dict[int, LocalHandle] = {}


def _local_handle(key: int) -> LocalHandle:
    return _LOCAL_HANDLES[key]


async def _construct(factory):
    return factory()


def get_or_create_log(path: str | Path, config: EventLogConfig, num_cpus: float = 0.1):
    """The log actor, on the head node (restarts included): the loss of any worker node never
    takes the single writer of the log with it."""
    return EventLogActor.options(
        name=LOG_ACTOR,
        namespace=NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        max_concurrency=1000,
        # Every append and read is a task whose events the GCS would keep (growing with the
        # load; docs/ray-notes.md); Serve turns them off for its replicas too.
        enable_task_events=False,
        **actor_options(num_cpus, resources=ON_HEAD),
    ).remote(str(path), config.model_dump(mode="json"))


def from_node(log):
    """The log actor handle as a replica's `rec.live.Live` calls it: its `head_info` and `read`
    calls name this process's Ray node, so the shared-memory head and records ring are used
    only on the log's own node, and the log counts who reads through it. Anything that is not
    a Ray actor handle (Serve's local testing mode) is returned as it is."""
    if not isinstance(log, ray.actor.ActorHandle):
        return log
    return _NodeLog(log, ray.get_runtime_context().get_node_id())


class _NodeLog:
    def __init__(self, log, node: str) -> None:
        self._log = log
        self.node = node
        self.head_info = SimpleNamespace(remote=lambda: log.head_info.remote(node))
        self.read = SimpleNamespace(
            remote=lambda start, limit=10_000: log.read.remote(start, limit, node)
        )

    def __getattr__(self, name: str):
        return getattr(self._log, name)


def get_log():
    return ray.get_actor(LOG_ACTOR, namespace=NAMESPACE)
