"""rec.push: which watches a published record answers, and which streams a change touches."""

from __future__ import annotations

import asyncio

import pytest

from rec.events import KIND_EVENT, KIND_IMPRESSION, KIND_ITEM, KIND_USER_DELETE
from rec.push import KEEPALIVE, Change, SSEReader, Streams, StreamsFull, Watches, scan, sse


def event(user: str, item: str, offset: int = 0) -> dict:
    return {"kind": KIND_EVENT, "user_id": user, "item_id": item, "offset": offset}


def answer(items: list[str], version: str = "v1") -> dict:
    return {"model_version": version, "items": [{"item_id": i} for i in items]}


def run(coro):
    return asyncio.run(coro)


def test_scan_names_watched_users_and_changed_items_only():
    records = [
        event("a", "i1"),
        event("z", "i2"),
        {"kind": KIND_USER_DELETE, "user_id": "b", "item_id": None},
        {"kind": KIND_ITEM, "item_id": "i9", "user_id": None},
        {"kind": KIND_IMPRESSION, "user_id": "a", "item_id": None},
    ]
    users, items = scan(records, frozenset({"a", "b"}))
    assert users == {"a", "b"}
    assert items == {"i9"}
    assert scan([records[4]], frozenset({"a"})) == (set(), set())


def test_a_published_event_answers_the_watch_of_its_user_and_no_other():
    async def go():
        w = Watches(head=10)
        mine = asyncio.ensure_future(w.wait("r1", ["a"], 10, [], 5.0))
        other = asyncio.ensure_future(w.wait("r2", ["b"], 10, [], 0.3))
        await asyncio.sleep(0)
        w.published([event("a", "i1", 10)], head=11)
        return await mine, await other, len(w)

    mine, other, pending = run(go())
    assert mine == Change(11, frozenset({"a"}))
    assert other.empty and other.head == 11  # timed out, told where the log is now
    assert pending == 0


def test_a_catalogue_change_answers_every_watch():
    async def go():
        w = Watches(head=0)
        both = [asyncio.ensure_future(w.wait(f"r{n}", [f"u{n}"], 0, [], 5.0)) for n in range(2)]
        await asyncio.sleep(0)
        w.published([{"kind": KIND_ITEM, "item_id": "i3", "user_id": None}], head=1)
        return [await f for f in both]

    assert [c.items for c in run(go())] == [frozenset({"i3"})] * 2


def test_the_backlog_since_the_watch_start_answers_at_once():
    async def go():
        w = Watches(head=5)
        hit = await w.wait("r", ["a"], 3, [event("b", "x", 3), event("a", "y", 4)], 5.0)
        lost = await w.wait("r", ["a"], 1, None, 5.0)  # the records are no longer in memory
        return hit, lost

    hit, lost = run(go())
    assert hit == Change(5, frozenset({"a"}))
    assert lost.behind and not lost.empty


def test_a_newer_watch_of_the_same_watcher_replaces_the_pending_one():
    async def go():
        w = Watches(head=0)
        first = asyncio.ensure_future(w.wait("r", ["a"], 0, [], 5.0))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(w.wait("r", ["a", "b"], 0, [], 5.0))
        await asyncio.sleep(0)
        answered_first = await asyncio.wait_for(first, 1.0)
        w.published([event("b", "i", 0)], head=1)
        return answered_first, await second, len(w)

    first, second, pending = run(go())
    assert first.empty
    assert second.users == frozenset({"b"})
    assert pending == 0


def test_streams_are_bounded_and_closing_frees_a_place():
    s = Streams(limit=2)
    a = s.open("a", 5)
    s.open("a", 5)
    with pytest.raises(StreamsFull):
        s.open("b", 5)
    s.close(a)
    s.close(a)  # twice is harmless
    s.open("b", 5)
    assert len(s) == 2 and sorted(s.users()) == ["a", "b"]


def test_a_change_touches_its_users_streams_those_showing_a_changed_item_and_all_on_a_swap():
    s = Streams(limit=10)
    a, b, c = s.open("a", 3), s.open("b", 3), s.open("c", 3)
    b.offer(answer(["i1", "i2"]), always=True)
    c.offer(answer(["i7"]), always=True)

    touched = s.touched(Change(9, frozenset({"a"}), frozenset({"i2"})), version_changed=False)
    assert {(t.user_id, always) for t, always in touched} == {("a", True), ("b", False)}
    everyone = s.touched(Change(9), version_changed=True)
    assert {t.user_id for t, _ in everyone} == {"a", "b", "c"}
    behind = s.touched(Change(9, behind=True), version_changed=False)
    assert all(always for _, always in behind) and len(behind) == 3
    assert s.touched(Change(9), version_changed=False) == []
    assert a is not b


def test_an_unchanged_list_is_sent_only_to_the_user_who_acted():
    async def go():
        s = Streams(limit=1).open("a", 2)
        assert s.offer(answer(["i1", "i2"]), always=True)
        first = await s.next(1.0)
        assert not s.offer(answer(["i1", "i2"]), always=False)  # nothing new to show
        assert s.offer(answer(["i1", "i2"], version="v2"), always=False)  # a new model
        assert s.offer(answer(["i2", "i1"]), always=False)  # replaces the unsent one
        newest = await s.next(1.0)
        idle = await s.next(0.05)
        return first, newest, idle, s.shown

    first, newest, idle, shown = run(go())
    assert [i["item_id"] for i in first["items"]] == ["i1", "i2"]
    assert [i["item_id"] for i in newest["items"]] == ["i2", "i1"]  # a slow reader skips lists
    assert idle is None
    assert shown == frozenset({"i1", "i2"})


def test_sse_messages_read_back_whole_in_any_chunking():
    lists = [{**answer(["i1"]), "offset": 7}, {**answer(["é", "i2"], "v2"), "offset": 9}]
    wire = KEEPALIVE + sse(lists[0]) + "event: other\ndata: {}\n\n" + KEEPALIVE + sse(lists[1])
    reader, got = SSEReader(), []
    for line in wire.splitlines(keepends=True):
        if (message := reader.line(line)) is not None:
            got.append(message)
    assert got == lists  # keepalives and other events skipped, order kept
    assert sse(lists[0]).startswith("event: recommendations\nid: 7\n")


def test_sse_reader_joins_data_lines_and_drops_a_message_without_data():
    reader = SSEReader()
    lines = ["event: recommendations", 'data: {"a":', "data: 1}", ""]
    assert [reader.line(x) for x in lines] == [None, None, None, {"a": 1}]
    assert [reader.line(x) for x in ("event: recommendations", "")] == [None, None]
