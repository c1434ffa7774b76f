"""Cluster tier: one local Ray instance for the session, the real Serve app over real HTTP."""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import threading
import time

import httpx
import pytest

from deployments.runtime import set_process_env
from rec.model import publish
from rec.push import SSEReader
from rec.train import snapshot_table, train
from tests.conftest import ADMIN, live_dataset, small_config

pytestmark = pytest.mark.ray


def wait_for(predicate, timeout_s: float = 60.0, interval_s: float = 0.05):
    """Poll until predicate() is truthy; return its value (fail after timeout_s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met in {timeout_s}s")
        time.sleep(interval_s)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    set_process_env()
    # Serve keeps a stopping ingress replica's direct-ingress port open 30 s for a load
    # balancer to notice; nothing balances here, and each app's deletion would wait it out.
    os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "1"
    import ray
    from ray import serve

    metrics_port = _free_port()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=256 * 2**20,
        logging_level="ERROR",
        _metrics_export_port=metrics_port,  # Prometheus, as `rec serve --metrics-port`
        _system_config={"metrics_report_interval_ms": 1000},  # a test waits seconds, not 10s
    )
    os.environ["REC_TEST_METRICS_URL"] = f"http://127.0.0.1:{metrics_port}/metrics"
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module", params=["fused", "split"])
def stack(request, ray_cluster, tmp_path_factory):
    """The app in one topology on a fresh data dir: data in the log, a first model published."""
    import ray

    from deployments.app import deploy, undeploy
    from deployments.trainer import get_or_create_trainer

    topology = request.param
    root = tmp_path_factory.mktemp(f"stack-{topology}")
    config = small_config(root, topology)
    log, model = seeded(config, seed=3)
    deploy(config)
    client = httpx.Client(base_url=ray_cluster, timeout=30, headers=ADMIN)
    wait_for(lambda: _ready(client), timeout_s=120, interval_s=0.2)
    yield {
        "client": client,
        "config": config,
        "model": model,
        "topology": topology,
        "log": log,
        "trainer": get_or_create_trainer(config),
    }
    client.close()
    undeploy()
    for name in ("rec_eventlog", "rec_trainer"):
        with contextlib.suppress(ValueError):
            ray.kill(ray.get_actor(name, namespace="rec"), no_restart=True)


def seeded(config, seed: int, shards: int = 1):
    """The log actor holding a live data set, and a first model trained on it and published
    (its index in `shards` parts when the HNSW index lives in shard actors)."""
    import ray

    from deployments.eventlog import get_or_create_log

    ds = live_dataset(seed=seed)
    records = ds.item_records() + ds.event_records()
    log = get_or_create_log(config.log_dir, config.eventlog)
    ray.get(log.append.remote(records), timeout=300)
    model = train(snapshot_table(records), config)
    model.save(config.model_dir, model.build_index(config.recall, shards))
    publish(config.model_dir, model.version)
    return log, model


def _ready(client: httpx.Client) -> bool:
    try:
        return client.get("/readyz").status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(autouse=True)
def _threads():
    os.environ.setdefault("OMP_NUM_THREADS", "1")


class Stream:
    """A GET /stream connection read on a thread of its own: `status` once the server
    answered, then each `recommendations` message in order (`next`)."""

    def __init__(self, base_url: str, user_id: str, k: int = 10, headers=ADMIN) -> None:
        self._messages: queue.Queue = queue.Queue()
        self._answered = threading.Event()
        self.status: int | None = None
        self.headers: httpx.Headers | None = None
        self.body = b""  # an answer other than 200
        self._client = httpx.Client(base_url=base_url, timeout=httpx.Timeout(30, read=None))
        self._request = self._client.build_request(
            "GET", "/stream", params={"user_id": user_id, "k": k}, headers=headers
        )
        self._response: httpx.Response | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            self._response = self._client.send(self._request, stream=True)
            self.status, self.headers = self._response.status_code, self._response.headers
            self._answered.set()
            if self.status != 200:
                self.body = self._response.read()
                return
            reader = SSEReader()
            for line in self._response.iter_lines():
                if (message := reader.line(line)) is not None:
                    self._messages.put(message)
        except Exception:  # closed by the test (from its thread), or the server went away
            pass
        finally:
            self._answered.set()

    def answered(self, timeout_s: float = 30.0) -> int | None:
        self._answered.wait(timeout_s)
        return self.status

    def next(self, timeout_s: float = 10.0) -> dict:
        """The next message (fails after timeout_s without one)."""
        return self._messages.get(timeout=timeout_s)

    def until(self, predicate, timeout_s: float = 10.0) -> dict:
        """The first message for which predicate(message) holds, skipping the others."""
        deadline = time.monotonic() + timeout_s
        while True:
            message = self.next(max(deadline - time.monotonic(), 0.001))
            if predicate(message):
                return message

    def close(self) -> None:
        if self._response is not None:
            self._response.close()
        self._client.close()
        self._thread.join(5)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
