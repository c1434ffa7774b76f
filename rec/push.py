"""Pushing a user's list when it changes (`GET /stream`): the log side and the replica side.

The log writer holds `Watches`: each stream replica (deployments.push) keeps one watch pending
there, naming the users it streams to; the writer answers it as soon as it publishes a record
that concerns one of them (their events, their deletion) or the catalogue (`Change`). Nothing
polls: an idle stream is an entry in two dicts and a pending call, whatever the number of
streams.

The replica holds `Streams`: the open streams by user, at most `limit` of them, each with the
newest list not yet sent (a slow reader skips lists, it never queues them). Which streams a
change touches is decided here (`Streams.touched`); computing and sending the lists is the
stream replica's. The wire format both sides share is at the end (`sse`, `SSEReader`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from rec.events import KIND_EVENT, KIND_ITEM, KIND_ITEM_DELETE, KIND_USER_DELETE

USER_KINDS = (KIND_EVENT, KIND_USER_DELETE)
CATALOG_KINDS = (KIND_ITEM, KIND_ITEM_DELETE)


@dataclass(frozen=True)
class Change:
    """What a watch answers: every record below `head` has been looked at; `users` are the
    watched users some of them concern, `items` the catalogue entries they changed. `behind`:
    the records since the watch's start were no longer in memory, so anything may have
    changed."""

    head: int
    users: frozenset[str] = frozenset()
    items: frozenset[str] = frozenset()
    behind: bool = False

    @property
    def empty(self) -> bool:
        return not (self.users or self.items or self.behind)


def scan(records: Iterable[dict], users: frozenset[str]) -> tuple[set[str], set[str]]:
    """The watched `users` the records concern, and the items whose catalogue entry they
    change (impressions concern nobody)."""
    hit: set[str] = set()
    items: set[str] = set()
    for r in records:
        kind = r.get("kind")
        if kind in USER_KINDS:
            if r["user_id"] in users:
                hit.add(r["user_id"])
        elif kind in CATALOG_KINDS:
            items.add(r["item_id"])
    return hit, items


@dataclass
class _Watch:
    users: frozenset[str]
    future: asyncio.Future


class Watches:
    """The log writer's pending watches, one per watcher (an ingress replica): a new watch of
    the same watcher answers its previous one at once (with nothing) and replaces it."""

    def __init__(self, head: int) -> None:
        self.head = head
        self._pending: dict[str, _Watch] = {}
        self._everyone: frozenset[str] | None = None  # every pending watch's users

    def __len__(self) -> int:
        return len(self._pending)

    async def wait(
        self,
        watcher: str,
        users: Iterable[str],
        after: int,
        backlog: list[dict] | None,
        timeout_s: float,
    ) -> Change:
        """The change since offset `after` that concerns `users` or the catalogue: at once
        when `backlog` (the records from `after` to the head; None: not in memory any more)
        holds one, else when one is published, else an empty change after `timeout_s`."""
        watched = frozenset(users)
        if after < self.head:
            if backlog is None:
                return Change(self.head, behind=True)
            hit, items = scan(backlog, watched)
            if hit or items:
                return Change(self.head, frozenset(hit), frozenset(items))
        previous = self._pending.pop(watcher, None)
        if previous is not None and not previous.future.done():
            previous.future.set_result(Change(self.head))
        future = asyncio.get_running_loop().create_future()
        watch = self._pending[watcher] = _Watch(watched, future)
        self._everyone = None
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            return Change(self.head)
        finally:
            if self._pending.get(watcher) is watch:
                del self._pending[watcher]
                self._everyone = None

    def published(self, records: list[dict], head: int) -> None:
        """Records just made durable, the head now past them: answer the watches they touch."""
        self.head = head
        if not self._pending:
            return
        if self._everyone is None:
            self._everyone = frozenset().union(*(w.users for w in self._pending.values()))
        hit, items = scan(records, self._everyone)
        if not (hit or items):
            return
        for watch in list(self._pending.values()):
            mine = watch.users & hit
            if (mine or items) and not watch.future.done():
                watch.future.set_result(Change(head, frozenset(mine), frozenset(items)))


@dataclass(eq=False)
class Stream:
    """One open stream: the user, how many items, the last list sent and the next to send."""

    user_id: str
    k: int
    key: str | None = None  # the API key it was opened with: its lists are asked for with it
    sent: dict | None = None
    _next: dict | None = None
    _ready: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def shown(self) -> frozenset[str]:
        """The items of the newest list given to this stream (sent or about to be)."""
        newest = self._next or self.sent
        return frozenset(i["item_id"] for i in newest["items"]) if newest else frozenset()

    def offer(self, answer: dict, always: bool) -> bool:
        """Queue `answer` to be sent, replacing one not sent yet; unless `always`, only when
        its items or model version differ from the newest given. True when queued."""
        newest = self._next or self.sent
        if not always and newest is not None and _same(newest, answer):
            return False
        self._next = answer
        self._ready.set()
        return True

    async def next(self, timeout_s: float) -> dict | None:
        """The next list to send, or None after `timeout_s` without one."""
        try:
            await asyncio.wait_for(self._ready.wait(), timeout_s)
        except TimeoutError:
            return None
        self._ready.clear()
        answer, self._next = self._next, None
        self.sent = answer
        return answer


def _same(a: dict, b: dict) -> bool:
    return a["model_version"] == b["model_version"] and [i["item_id"] for i in a["items"]] == [
        i["item_id"] for i in b["items"]
    ]


class StreamsFull(Exception):
    """The replica holds `limit` streams already."""


class Streams:
    """A replica's open streams by user, at most `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.by_user: dict[str, set[Stream]] = {}
        self.count = 0
        self.changed = asyncio.Event()  # set when a user is added: the watch must name them

    def __len__(self) -> int:
        return self.count

    def open(self, user_id: str, k: int, key: str | None = None) -> Stream:
        if self.count >= self.limit:
            raise StreamsFull(f"this replica holds {self.limit} streams, its limit")
        stream = Stream(user_id, k, key)
        if user_id not in self.by_user:
            self.by_user[user_id] = set()
            self.changed.set()
        self.by_user[user_id].add(stream)
        self.count += 1
        return stream

    def close(self, stream: Stream) -> None:
        streams = self.by_user.get(stream.user_id)
        if streams is None or stream not in streams:
            return
        streams.discard(stream)
        self.count -= 1
        if not streams:
            del self.by_user[stream.user_id]

    def users(self) -> list[str]:
        return list(self.by_user)

    def touched(self, change: Change, version_changed: bool) -> list[tuple[Stream, bool]]:
        """The streams a change touches, each with whether it gets a list even when the list
        is unchanged (its user acted: they see their action answered): the users' own
        streams; streams showing an item whose catalogue entry changed; every stream when the
        replica serves another model version or fell behind the log."""
        out: list[tuple[Stream, bool]] = []
        for user, streams in self.by_user.items():
            own = user in change.users or change.behind
            for s in streams:
                if own or version_changed or (change.items and change.items & s.shown):
                    out.append((s, own))
        return out


# -- the wire: Server-Sent Events ----------------------------------------------------------

EVENT = "recommendations"  # the SSE event name of a list
# A stream with nothing to send writes this SSE comment every KEEPALIVE_S: proxies keep the
# connection, the server notices a client that went away by the failed write, and a client
# that hears nothing for longer knows the stream is dead.
KEEPALIVE = ": keepalive\n\n"
KEEPALIVE_S = 15.0


def sse(answer: dict) -> str:
    """One list as an SSE message; its `id` is the log offset the list reflects."""
    data = json.dumps(answer, separators=(",", ":"))
    return f"event: {EVENT}\nid: {answer['offset']}\ndata: {data}\n\n"


class SSEReader:
    """The client side: lines of a text/event-stream in, each complete list out
    (`line` returns the decoded message on the blank line that ends it, else None). Comments,
    ids and events other than EVENT are skipped; data lines are joined with newlines."""

    def __init__(self) -> None:
        self._event: str | None = None
        self._data: list[str] = []

    def line(self, line: str) -> dict | None:
        line = line.rstrip("\r\n")
        if line:
            field_, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field_ == "event":
                self._event = value
            elif field_ == "data":
                self._data.append(value)
            return None
        event, data = self._event, self._data
        self._event, self._data = None, []
        return json.loads("\n".join(data)) if event == EVENT and data else None
