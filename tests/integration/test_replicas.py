"""Read-your-writes across two ingress replicas (fused: each holds the whole pipeline): an
event posted to one replica's direct-ingress port is reflected by the next /recommend that
the other replica serves, which learns of it from the log, not from the replica that took it."""

from __future__ import annotations

import contextlib

import httpx
import pytest

from deployments.cli import direct_targets
from tests.conftest import ADMIN, small_config
from tests.integration.conftest import _ready, seeded, wait_for


@pytest.fixture(scope="module")
def two_replicas(ray_cluster, tmp_path_factory):
    import ray

    from deployments.app import deploy, undeploy

    config = small_config(tmp_path_factory.mktemp("two-replicas"), "fused")
    log, _ = seeded(config, seed=4)
    deploy(config, replicas=2)
    proxy = httpx.Client(base_url=ray_cluster, timeout=30, headers=ADMIN)
    wait_for(lambda: _ready(proxy), timeout_s=180, interval_s=0.2)
    urls = wait_for(lambda: len(direct_targets("127.0.0.1").get("rec", [])) == 2, timeout_s=60)
    assert urls
    a, b = (
        httpx.Client(base_url=u, timeout=30, headers=ADMIN)
        for u in direct_targets("127.0.0.1")["rec"]
    )
    for c in (a, b):
        wait_for(lambda c=c: _ready(c), timeout_s=180, interval_s=0.2)
    yield a, b, log
    for c in (proxy, a, b):
        c.close()
    undeploy()
    for name in ("rec_eventlog", "rec_trainer"):
        with contextlib.suppress(ValueError):
            ray.kill(ray.get_actor(name, namespace="rec"), no_restart=True)


def test_an_event_at_one_replica_is_in_the_other_replicas_next_answer(two_replicas):
    a, b, _ = two_replicas
    reflected = 0
    for n in range(20):
        user = f"rr-{n}"
        writer, reader = (a, b) if n % 2 == 0 else (b, a)
        first = reader.get("/recommend", params={"user_id": user, "k": 10})
        assert first.status_code == 200, first.text
        item = first.json()["items"][0]["item_id"]
        post = writer.post("/events", json={"user_id": user, "item_id": item, "type": "click"})
        assert post.status_code == 200, post.text
        after = reader.get("/recommend", params={"user_id": user, "k": 10}).json()["items"]
        # the clicked item is seen, so filtered; its neighbours come in through item-CF
        assert item not in {i["item_id"] for i in after}, (n, after)
        reflected += any("itemcf" in i["sources"] for i in after)
    assert reflected >= 15  # the click shaped the list, not only filtered it
