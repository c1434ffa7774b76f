"""The whole Serve app in local testing mode, fused and split: same behaviour."""

from __future__ import annotations

import asyncio
import importlib
import shutil
import time

import pytest
from fastapi import HTTPException
from ray import serve

import deployments.app
import deployments.ingress
from deployments.eventlog import EventLogService, LocalHandle
from tests.conftest import small_config


@pytest.fixture(params=["fused", "split"])
def app(request, tmp_path, trained):
    src, model = trained
    shutil.copytree(src, tmp_path / "data")
    config = small_config(tmp_path / "data", request.param)
    log = LocalHandle(lambda: EventLogService(str(config.log_dir), config.eventlog.model_dump()))
    # Local mode runs the FastAPI app in this process, after which it no longer pickles; a fresh
    # module gives each app its own (on a cluster the driver never runs it).
    importlib.reload(deployments.ingress)
    importlib.reload(deployments.app)
    handle = serve.run(
        deployments.app.build_app(config, log=log),
        _local_testing_mode=True,
        name=f"rec-{request.param}",
    )
    yield handle, model
    log.close()


def call(handle, method: str, *args):
    return getattr(handle, method).remote(*args).result()


def test_recommend_shape_and_version(app):
    handle, model = app
    out = call(handle, "recommend", {"user_id": "u1", "k": 7})
    assert out["user_id"] == "u1"
    assert out["model_version"] == model.version
    assert len(out["items"]) == 7
    assert len({i["item_id"] for i in out["items"]}) == 7
    scores = [i["score"] for i in out["items"]]
    for item in out["items"]:
        assert item["reason"] and item["sources"]
        assert 0.0 <= item["score"] <= 1.0
    assert out["request_id"]
    assert scores == sorted(scores, reverse=True) or any(
        set(i["sources"]) <= {"pop", "new"} for i in out["items"]
    )


def test_read_your_writes(app):
    handle, _ = app
    before = call(handle, "recommend", {"user_id": "u5", "k": 10})
    target = before["items"][0]["item_id"]
    call(handle, "ingest_events", {"user_id": "u5", "item_id": target, "type": "purchase"})
    after = call(handle, "recommend", {"user_id": "u5", "k": 10})
    assert target not in {i["item_id"] for i in after["items"]}


def test_unknown_user_gets_cold_start(app):
    handle, _ = app
    out = call(handle, "recommend", {"user_id": "never-seen", "k": 5})
    assert len(out["items"]) == 5
    assert all(set(i["sources"]) <= {"pop", "new"} for i in out["items"])


def test_new_user_first_click_changes_answer(app):
    handle, _ = app
    cold = call(handle, "recommend", {"user_id": "fresh", "k": 10})
    call(
        handle,
        "ingest_events",
        {
            "events": [
                {"user_id": "fresh", "item_id": "i3", "type": "click"},
                {"user_id": "fresh", "item_id": "i4", "type": "click"},
            ]
        },
    )
    warm = call(handle, "recommend", {"user_id": "fresh", "k": 10})
    assert {"i3", "i4"}.isdisjoint(i["item_id"] for i in warm["items"])
    assert any("itemcf" in i["sources"] or "ann" in i["sources"] for i in warm["items"])
    assert [i["item_id"] for i in warm["items"]] != [i["item_id"] for i in cold["items"]]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"item_id": "i1", "type": "click"}, "user_id"),
        ({"user_id": "u1", "item_id": "i1", "type": "teleport"}, "type"),
        ({"user_id": "u1", "item_id": "i1", "type": "rating"}, "value"),
        ({"user_id": "u1", "item_id": "i1", "type": "click", "value": "high"}, "value"),
        ({"user_id": "u1", "item_id": "i1", "type": "click", "extra": 1}, "extra"),
        (
            {"events": [{"user_id": "u1", "item_id": "i1", "type": "click"}, {"user_id": "u1"}]},
            "events.1.item_id",
        ),
        ([1, 2, 3], "body"),
    ],
)
def test_bad_events_are_rejected_with_the_field(app, body, field):
    handle, _ = app
    with pytest.raises(HTTPException) as err:
        call(handle, "ingest_events", body)
    assert err.value.status_code == 422
    fields = [d["field"] for d in err.value.detail]
    assert any(f == field or f.startswith(field) for f in fields), fields


def test_bad_recommend_requests(app):
    handle, _ = app
    for body in (
        {"k": 3},
        {"user_id": "u1", "k": 0},
        {"user_id": "u1", "k": 10_000},
        {"user_id": "u1", "bogus": True},
    ):
        with pytest.raises(HTTPException) as err:
            call(handle, "recommend", body)
        assert err.value.status_code == 422


def test_deleted_item_never_comes_back(app):
    handle, _ = app
    out = call(handle, "recommend", {"user_id": "u2", "k": 10})
    victim = out["items"][0]["item_id"]
    call(handle, "remove_item", victim)
    for user in ("u2", "u3", "nobody"):
        items = call(handle, "recommend", {"user_id": user, "k": 50})["items"]
        assert victim not in {i["item_id"] for i in items}
    similar = call(handle, "similar_items", out["items"][1]["item_id"], 50)["items"]
    assert victim not in {i["item_id"] for i in similar}


def test_new_item_is_recommendable_without_retrain(app):
    handle, _ = app
    call(handle, "upsert_items", {"item_id": "brand-new", "category": "c01", "tags": ["c01-t1"]})
    assert call(handle, "item", "brand-new")["category"] == "c01"
    for user in ("a", "b", "c"):
        call(
            handle,
            "ingest_events",
            {
                "events": [
                    {"user_id": f"nu-{user}", "item_id": "i7", "type": "click"},
                    {"user_id": f"nu-{user}", "item_id": "brand-new", "type": "click"},
                ]
            },
        )
    call(handle, "ingest_events", {"user_id": "probe", "item_id": "i7", "type": "click"})
    items = call(handle, "recommend", {"user_id": "probe", "k": 20})["items"]
    fresh = [i for i in items if i["item_id"] == "brand-new"]
    assert fresh and "new" in fresh[0]["sources"] and fresh[0]["reason"] == "new in c01"


def test_forget_user(app):
    handle, _ = app
    call(handle, "ingest_events", {"user_id": "gone", "item_id": "i9", "type": "click"})
    out = call(handle, "forget_user", "gone")
    assert out["deleted_events"] == 1
    again = call(handle, "recommend", {"user_id": "gone", "k": 5})
    assert all(set(i["sources"]) <= {"pop", "new"} for i in again["items"])


def test_similar_and_unknown_item(app):
    handle, _ = app
    out = call(handle, "similar_items", "i1", 5)
    assert len(out["items"]) == 5 and "i1" not in {i["item_id"] for i in out["items"]}
    with pytest.raises(HTTPException) as err:
        call(handle, "similar_items", "no-such-item", 5)
    assert err.value.status_code == 404


def test_ready_and_models(app):
    handle, model = app
    deadline = time.monotonic() + 60
    ok, body = call(handle, "readiness")
    while not ok and body["why"] == "loading" and time.monotonic() < deadline:
        ok, body = call(handle, "readiness")
    assert ok, body
    assert body["model_version"] == model.version
    info = call(handle, "model_info")
    assert info["serving"] == info["published"] == model.version


@pytest.mark.filterwarnings("ignore:coroutine 'Aggregator.__del__' was never awaited")
def test_shutdown_appends_the_impressions_still_gathered(tmp_path, trained, monkeypatch):
    """Serve calls `__del__` once the last request has drained: the impressions waiting for
    their timed flush reach the log then instead of being lost with the replica."""
    monkeypatch.setattr(deployments.ingress, "IMPRESSION_FLUSH_S", 600.0)  # only __del__ flushes
    src, _ = trained
    shutil.copytree(src, tmp_path / "data")
    config = small_config(tmp_path / "data")
    log = LocalHandle(lambda: EventLogService(str(config.log_dir), config.eventlog.model_dump()))
    user_class = deployments.ingress.Aggregator.func_or_class.__mro__[1]  # under serve.ingress

    async def scenario() -> None:
        aggregator = user_class(config.model_dump(mode="json"), log)
        before = await log.next_offset.remote()
        out = await aggregator.recommend({"user_id": "u1", "k": 3})
        assert await log.next_offset.remote() == before  # gathered, its flush not due yet
        await aggregator.__del__()
        records = await log.read.remote(before, 10)
        assert [(r["kind"], r["request_id"]) for r in records] == [
            ("impression", out["request_id"])
        ]

    try:
        asyncio.run(scenario())
    finally:
        log.close()


def test_openapi_describes_every_body_and_the_key() -> None:
    """Routes read their JSON bodies themselves (the fast path) and declare them by hand: every
    body is described, every $ref resolves, and the keyed routes name the key scheme."""
    from deployments.ingress import api

    api.openapi_schema = None
    doc = api.openapi()
    schemas = doc["components"]["schemas"]

    def refs(obj):
        if isinstance(obj, dict):
            for key, value in obj.items():
                if key == "$ref":
                    yield value
                else:
                    yield from refs(value)
        elif isinstance(obj, list):
            for value in obj:
                yield from refs(value)

    assert all(r.split("/")[-1] in schemas for r in refs(doc))
    bodies = {
        ("/events", "post"): {"EventIn", "EventBatchIn"},
        ("/items", "post"): {"ItemIn", "ItemBatchIn"},
        ("/recommend", "post"): {"RecommendIn"},
    }
    for (path, method), names in bodies.items():
        schema = doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
        got = {r.split("/")[-1] for r in refs(schema)}
        assert got == names, (path, got)
    assert set(schemas["EventIn"]["properties"]) >= {"user_id", "item_id", "type", "value"}
    assert schemas["EventIn"]["properties"]["type"]["enum"][0] == "view"
    for path, method in (("/events", "post"), ("/items", "post"), ("/users/{user_id}", "delete")):
        assert doc["paths"][path][method]["security"] == [{"ApiKey": []}]
    assert doc["components"]["securitySchemes"]["ApiKey"]["name"] == "X-API-Key"
