"""The real app over HTTP on a local Ray, in both topologies."""

from __future__ import annotations

import json
import queue
import time

import numpy as np
import pytest

from rec.events import KIND_EVENT
from tests.integration.conftest import Stream, wait_for


def test_recommend_and_cold_start(stack):
    c = stack["client"]
    out = c.get("/recommend", params={"user_id": "u1", "k": 10}).json()
    assert len(out["items"]) == 10 and out["model_version"] == stack["model"].version
    cold = c.get("/recommend", params={"user_id": "stranger", "k": 5})
    assert cold.status_code == 200 and len(cold.json()["items"]) == 5
    post = c.post(
        "/recommend",
        json={
            "user_id": "u1",
            "k": 5,
            "exclude": [out["items"][0]["item_id"]],
            "context": {"hour": 20},
        },
    )
    assert post.status_code == 200
    assert out["items"][0]["item_id"] not in {i["item_id"] for i in post.json()["items"]}
    assert c.get("/healthz").json() == {"status": "ok"}
    assert c.get("/docs").status_code == 200


def test_read_your_writes(stack):
    """After POST /events answers, the very next /recommend reflects it."""
    c = stack["client"]
    lags = []
    for n in range(20):
        user = f"ryw-{n}"
        first = c.get("/recommend", params={"user_id": user, "k": 10}).json()["items"]
        item = first[0]["item_id"]
        assert (
            c.post("/events", json={"user_id": user, "item_id": item, "type": "click"}).status_code
            == 200
        )
        t0 = time.perf_counter()
        after = c.get("/recommend", params={"user_id": user, "k": 10}).json()["items"]
        lags.append((time.perf_counter() - t0) * 1000)
        assert item not in {i["item_id"] for i in after}  # filtered as seen
        assert any(s in i["sources"] for i in after for s in ("itemcf", "ann", "usercf"))
    print(
        f"\n[{stack['topology']}] POST /events answer -> reflecting /recommend: "
        f"p50 {np.percentile(lags, 50):.1f} ms, p99 {np.percentile(lags, 99):.1f} ms"
    )


def test_bad_input_gets_4xx_and_server_stays_healthy(stack):
    c = stack["client"]
    cases = [
        (c.post("/events", content=b"{not json"), 400, None),
        (c.post("/events", json={"user_id": "u1", "type": "click"}), 422, "item_id"),
        (
            c.post("/events", json={"user_id": ["x"], "item_id": "i1", "type": "click"}),
            422,
            "user_id",
        ),
        (
            c.post(
                "/events",
                json={"user_id": "u1", "item_id": "i1", "type": "click", "ts": "yesterday"},
            ),
            422,
            "ts",
        ),
        (c.post("/events", json={"events": []}), 422, "events"),
        (c.post("/events", content=b"x" * 5_000_000), 413, None),
        (
            c.post(
                "/events",
                json={"events": [{"user_id": "u", "item_id": "i", "type": "view"}] * 10_001},
            ),
            413,
            None,
        ),
        (c.get("/recommend", params={"k": 3}), 422, "user_id"),
        (c.get("/recommend", params={"user_id": "u1", "k": -1}), 422, "k"),
        (c.get("/recommend", params={"user_id": "u1", "k": "ten"}), 422, "k"),
        (c.get("/recommend", params={"user_id": ""}), 422, "user_id"),
        (c.post("/recommend", json={"user_id": "u1", "k": "ten"}), 422, "k"),
        (c.get("/similar", params={"item_id": "nope"}), 404, None),
        (c.post("/admin/retrain", headers={"X-API-Key": "not-a-key-0123456789"}), 401, None),
    ]
    for resp, status, field in cases:
        assert resp.status_code == status, (resp.request.url, resp.text[:300])
        if field:
            assert field in json.dumps(resp.json()["detail"]), resp.text[:300]
    import ray

    n_before = ray.get(stack["log"].next_offset.remote())
    # nothing half-written: a batch with one bad event appends nothing. Impressions of earlier
    # answers may be flushed meanwhile, so the check is on events: the only one appended after
    # the bad batch is the good one posted next.
    bad = {"events": [{"user_id": "u1", "item_id": "i1", "type": "click"}, {"user_id": "u1"}]}
    assert c.post("/events", json=bad).status_code == 422
    good = {"user_id": "u1", "item_id": "i2", "type": "view"}
    assert c.post("/events", json=good).status_code == 200
    appended = ray.get(stack["log"].read.remote(n_before))
    events = [(r["user_id"], r["item_id"], r["type"]) for r in appended if r["kind"] == KIND_EVENT]
    assert events == [("u1", "i2", "view")]
    assert c.get("/healthz").status_code == 200
    assert c.get("/recommend", params={"user_id": "u1"}).status_code == 200
    # GET /recommend reads its query itself; the OpenAPI page still declares it
    params = c.get("/openapi.json").json()["paths"]["/recommend"]["get"]["parameters"]
    assert {(p["name"], p["required"]) for p in params} == {
        ("user_id", True),
        ("k", False),
        ("exclude", False),
        ("categories", False),
        ("exclude_categories", False),
        ("include_seen", False),
    }


def test_catalogue_and_forgetting(stack):
    c = stack["client"]
    assert c.post("/items", json={"item_id": "fresh-1", "category": "c02"}).status_code == 200
    assert c.get("/items/fresh-1").json()["category"] == "c02"
    victim = c.get("/recommend", params={"user_id": "u4", "k": 1}).json()["items"][0]["item_id"]
    assert c.delete(f"/items/{victim}").status_code == 200
    wait_for(lambda: c.get(f"/items/{victim}").json()["deleted"])
    assert victim not in {
        i["item_id"] for i in c.get("/recommend", params={"user_id": "u4", "k": 50}).json()["items"]
    }
    c.post("/events", json={"user_id": "forget-me", "item_id": "i1", "type": "click"})
    assert c.delete("/users/forget-me").json()["deleted_events"] == 1
    items = c.get("/recommend", params={"user_id": "forget-me", "k": 5}).json()["items"]
    assert all(set(i["sources"]) <= {"pop", "new"} for i in items)


def test_request_filters_over_http(stack):
    """categories / exclude_categories / include_seen on GET (comma lists) and POST; an
    unknown category is a 422 that names it."""
    c = stack["client"]
    items = {}
    for item in c.get("/recommend", params={"user_id": "u1", "k": 50}).json()["items"]:
        items[item["item_id"]] = c.get(f"/items/{item['item_id']}").json()["category"]
    cat = max(set(items.values()) - {None}, key=list(items.values()).count)
    only = c.get("/recommend", params={"user_id": "u1", "k": 5, "categories": cat}).json()
    assert only["items"]
    assert {c.get(f"/items/{i['item_id']}").json()["category"] for i in only["items"]} == {cat}
    without = c.post(
        "/recommend", json={"user_id": "u1", "k": 20, "exclude_categories": [cat]}
    ).json()
    assert without["items"]
    assert cat not in {c.get(f"/items/{i['item_id']}").json()["category"] for i in without["items"]}
    bad = c.get("/recommend", params={"user_id": "u1", "categories": f"{cat},no-such,nor-this"})
    assert bad.status_code == 422
    assert (
        "no-such" in bad.text
        and "nor-this" in bad.text
        and bad.json()["detail"][0]["field"] == "categories"
    )
    bad = c.post("/recommend", json={"user_id": "u1", "exclude_categories": ["no-such"]})
    assert bad.status_code == 422 and "no-such" in bad.text
    # include_seen: an item the user just clicked may come back; by default it never does
    clicked = only["items"][0]["item_id"]
    assert (
        c.post("/events", json={"user_id": "u1", "item_id": clicked, "type": "click"}).status_code
        == 200
    )
    default = c.get("/recommend", params={"user_id": "u1", "k": 5, "categories": cat}).json()
    assert clicked not in {i["item_id"] for i in default["items"]}
    seen_too = c.get(
        "/recommend", params={"user_id": "u1", "k": 50, "categories": cat, "include_seen": "true"}
    ).json()
    assert clicked in {i["item_id"] for i in seen_too["items"]}


# ---- push: GET /stream -----------------------------------------------------------------------


def test_a_stream_sends_the_list_then_each_change(stack):
    """The current list on connect; after the user's event is acknowledged, a list reflecting
    it (its offset past the event's), the clicked item gone; a catalogue change to an item the
    list shows pushes a list without it; another user's event pushes nothing."""
    c = stack["client"]
    base = str(c.base_url)
    with Stream(base, "push-1", k=10) as s, Stream(base, "push-2", k=10) as other:
        assert s.answered() == 200 and other.answered() == 200, (s.body, other.body)
        first = s.next()
        assert first["trigger"] == "connect" and first["user_id"] == "push-1"
        assert len(first["items"]) == 10 and first["model_version"] == stack["model"].version
        assert other.next()["trigger"] == "connect"
        lags = []
        shown = first
        for n in range(5):
            item = shown["items"][0]["item_id"]
            ack = c.post("/events", json={"user_id": "push-1", "item_id": item, "type": "click"})
            t0 = time.perf_counter()
            assert ack.status_code == 200, ack.text
            acked = ack.json()["last_offset"]
            shown = s.until(lambda m, acked=acked: m["offset"] > acked)
            lags.append((time.perf_counter() - t0) * 1000)
            assert shown["trigger"] == "events", (n, shown)
            assert item not in {i["item_id"] for i in shown["items"]}
        victim = shown["items"][3]["item_id"]
        assert c.delete(f"/items/{victim}").status_code == 200
        after = s.until(lambda m: m["trigger"] == "catalog")
        assert victim not in {i["item_id"] for i in after["items"]}
        # push-2 got nothing from push-1's clicks: at most the catalogue change, if it showed it
        with pytest.raises(queue.Empty):
            other.until(lambda m: m["trigger"] != "catalog", timeout_s=0.5)
    print(
        f"\n[{stack['topology']}] POST /events answer -> pushed list: "
        f"p50 {np.percentile(lags, 50):.1f} ms, max {max(lags):.1f} ms"
    )


def test_streams_are_bounded_per_replica_and_the_bound_answers_503(stack):
    c = stack["client"]
    base = str(c.base_url)
    bad = [
        c.get("/stream"),
        c.get("/stream", params={"user_id": "u1", "k": 0}),
        c.get("/stream", params={"user_id": "u1", "k": 10_000}),
    ]
    assert [r.status_code for r in bad] == [422, 422, 422], [r.text for r in bad]
    limit = stack["config"].serving.max_streams
    # streams an earlier test closed hold their place until the replica notices (at most
    # until its next keepalive write)
    streams = [
        wait_for(lambda n=n: _opened(base, f"bound-{n}"), timeout_s=30) for n in range(limit)
    ]
    try:
        with Stream(base, "bound-over", k=3) as over:
            assert over.answered() == 503, over.body
            assert int(over.headers["retry-after"]) > 0
        streams.pop().close()  # a closed stream frees its place
        t0 = time.perf_counter()
        streams.append(wait_for(lambda: _opened(base, "bound-again"), timeout_s=30))
        print(
            f"\n[{stack['topology']}] a closed stream's place free in {time.perf_counter() - t0:.1f} s"
        )
    finally:
        for s in streams:
            s.close()


def _opened(base: str, user: str) -> Stream | None:
    s = Stream(base, user, k=3)
    if s.answered() == 200:
        return s
    s.close()
    return None
