"""Crashes and model swaps while serving: the log actor killed with SIGKILL, a retrain and
hot reload under continuous traffic."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import ray

from tests.conftest import ADMIN
from tests.integration.conftest import Stream, wait_for


def test_log_actor_sigkill_loses_no_acknowledged_event(stack):
    c, log = stack["client"], stack["log"]
    acked: list[str] = []
    for n in range(100):
        rid = f"dur-{stack['topology']}-{n}"
        body = {"user_id": f"d{n % 7}", "item_id": f"i{n % 50}", "type": "click", "request_id": rid}
        if c.post("/events", json=body).status_code == 200:
            acked.append(rid)
    batch = [
        {
            "user_id": "db",
            "item_id": f"i{n}",
            "type": "view",
            "request_id": f"dur-{stack['topology']}-b{n}",
        }
        for n in range(50)
    ]
    assert c.post("/events", json={"events": batch}).status_code == 200
    acked += [e["request_id"] for e in batch]

    before = ray.get(log.recovery.remote())
    segments = sorted(Path(stack["config"].log_dir).glob("*.seg"))
    with open(segments[-1], "ab") as f:  # a write torn by the crash: half a frame at the tail
        f.write(b"RECF\x00\x10\x00\x00garbage")
    os.kill(before["pid"], signal.SIGKILL)

    after = wait_for(lambda: _recovered(log, before["pid"]), timeout_s=60, interval_s=0.1)
    assert after["bytes_cut"] == len(b"RECF\x00\x10\x00\x00garbage")
    assert after["next_offset"] == before["next_offset"]
    records = ray.get(log.read.remote(0, 10_000_000))
    prefix = f"dur-{stack['topology']}-"
    rids = [r["request_id"] for r in records if (r.get("request_id") or "").startswith(prefix)]
    assert sorted(rids) == sorted(acked)  # every acknowledged event, none twice
    offsets = [r["offset"] for r in records]
    assert offsets == sorted(set(offsets))
    # the serving graph keeps working through the restarted actor
    wait_for(
        lambda: (
            c.post("/events", json={"user_id": "d1", "item_id": "i1", "type": "click"}).status_code
            == 200
        )
    )
    assert c.get("/recommend", params={"user_id": "d1"}).status_code == 200


def _recovered(log, old_pid: int):
    try:
        info = ray.get(log.recovery.remote(), timeout=5)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return None
    return info if info["pid"] != old_pid else None


def test_retrain_and_hot_reload_without_a_failed_request(stack):
    c, config = stack["client"], stack["config"]
    old = c.get("/models").json()["serving"]
    failures: list[str] = []
    versions: list[str] = []
    stop = threading.Event()

    def traffic():
        with httpx.Client(base_url=str(c.base_url), timeout=30, headers=ADMIN) as client:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    r = client.get("/recommend", params={"user_id": f"u{n % 50}", "k": 10})
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:200]}")
                    else:
                        versions.append(r.json()["model_version"])
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        t0 = time.perf_counter()
        r = c.post(
            "/admin/retrain",
            params={"wait": "true"},
            headers=ADMIN,
            timeout=600,
        )
        assert r.status_code == 200, r.text
        new = r.json()["published"]
        trained = time.perf_counter() - t0
        wait_for(lambda: c.get("/models").json()["serving"] == new, timeout_s=120)
        swapped = time.perf_counter() - t0
        n_before = len(versions)
        wait_for(lambda: len(versions) > n_before + 20, timeout_s=60)
    finally:
        stop.set()
        worker.join()
    print(
        f"\n[{stack['topology']}] retrain (Ray Train) {trained:.1f} s, serving the new model "
        f"{swapped:.1f} s after the request; {len(versions)} requests, {len(failures)} failed"
    )
    assert not failures, failures[:5]
    assert new != old and versions[0] == old and versions[-1] == new
    # the trainer checkpointed the new version's live state at its snapshot's offset before
    # publishing it, and the replicas built their state from it (only the records since applied)
    at_snapshot = f"{r.json()['log_offset']:012d}-{new}"
    assert (config.checkpoint_dir / at_snapshot / "meta.json").exists()
    assert c.get("/models").json()["started_from"] == at_snapshot


# Every metric rec exports (deployments/telemetry.py), as Ray's Prometheus exporter names them:
# its namespace "ray_" before rec's own names.
METRICS = (
    "ray_rec_stage_latency_ms_bucket",
    "ray_rec_answers_total",
    "ray_rec_answer_items_total",
    "ray_rec_events_ingested_total",
    "ray_rec_impressions_total",
    "ray_rec_http_errors_total",
    "ray_rec_follower_offset",
    "ray_rec_served_model",
    "ray_rec_log_head",
    "ray_rec_log_records_total",
    "ray_rec_retrain_seconds",
    "ray_rec_retrains_total",
    "ray_rec_published_model",
    "ray_rec_streams_open",
    "ray_rec_pushes_total",
)


def test_metrics_are_exported_with_values(stack):
    """After a few requests (and the retrain of the test before), Ray's metrics endpoint has
    every rec metric with a value, per stage, ordering, source, event type and status."""
    c = stack["client"]
    for n in range(5):
        assert c.get("/recommend", params={"user_id": f"u{n}"}).status_code == 200
        body = {"user_id": f"u{n}", "item_id": "i1", "type": "click"}
        assert c.post("/events", json=body).status_code == 200
    assert c.get("/similar", params={"item_id": "no-such-item"}).status_code == 404
    assert c.post("/events", json={"user_id": "u1"}).status_code == 422
    with Stream(str(c.base_url), "u1") as s:  # a stream: rec_streams_open, rec_pushes_total
        assert s.answered() == 200 and s.next()["trigger"] == "connect"
    url = os.environ["REC_TEST_METRICS_URL"]

    def scraped() -> dict[str, list[str]] | None:
        try:
            text = httpx.get(url, timeout=5).text
        except httpx.HTTPError:
            return None
        found: dict[str, list[str]] = {}
        for line in text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in METRICS:
                found.setdefault(name, []).append(line)
        missing[:] = sorted(set(METRICS) - set(found))
        return found if not missing else None

    missing: list[str] = []
    try:
        found = wait_for(scraped, timeout_s=60, interval_s=1)
    except TimeoutError:
        pytest.fail(f"not exported: {missing}")
    text = "\n".join(line for lines in found.values() for line in lines)
    for stage in ("profile", "recall", "rank", "finalize"):
        assert f'stage="{stage}"' in text
    assert 'type="click"' in text and 'status="404"' in text and 'status="422"' in text
    assert 'result="published"' in text and 'trigger="connect"' in text
    assert f'version="{c.get("/models").json()["serving"]}"' in text
    head = [float(x.rsplit(" ", 1)[1]) for x in found["ray_rec_log_head"]]
    assert max(head) > 0
