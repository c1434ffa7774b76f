"""Cluster tier: a multi-node Ray cluster on this one machine (`ray.cluster_utils.Cluster`: a
head and two worker nodes, each a raylet of its own with its own resources), the split
topology deployed across it as `configs/serve.yaml` and `cluster.yaml` lay it out, real HTTP.

    head      the event log and the trainer (deployments.runtime.ON_HEAD), the Serve
              controller and the HTTP proxy (proxy_location HeadOnly); no replica
    worker a  cluster.yaml's cpu_worker: an ingress, a profile and a recall replica, a shard
    worker b  cluster.yaml's gpu_worker, its GPU stood in for by its custom resource
              (ranker_gpu): the same, and the ranker

The cluster is this module's: started before its first test, torn down after its last, even
when a test fails (and by Ray's reaper processes if this process dies). Any Ray this process
was connected to (another tier's) is shut down first: one driver, one cluster at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest
import yaml

from deployments.runtime import set_process_env
from rec.config import RecConfig
from rec.model import publish
from rec.train import snapshot_table, train
from tests.conftest import ADMIN, live_dataset, small_config
from tests.integration.conftest import _free_port, _ready, wait_for

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
MiB = 2**20
START_TIMEOUT_S = 300  # 2 cores, possibly shared with a benchmark: start-up is slow


def layout() -> dict:
    """What the cluster files say: the worker nodes' resources (cluster.yaml's node types;
    the GPU worker's GPU left out: its custom resource stands in for it here), the head's Ray
    system config (its failure detection), the serving settings and replica counts of
    configs/serve.yaml."""
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    types = cluster["available_node_types"]
    app = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())["applications"][0]
    return {
        "a": dict(types["cpu_worker"]["resources"]),
        "b": {k: v for k, v in types["gpu_worker"]["resources"].items() if k != "GPU"},
        "system_config": head_system_config(cluster),
        "serving": app["args"]["serving"],
        "replicas": {d["name"]: d["num_replicas"] for d in app["deployments"]},
    }


def head_system_config(cluster: dict) -> dict:
    """The JSON of `--system-config='...'` in cluster.yaml's head start command ({} if none)."""
    for command in cluster["head_start_ray_commands"]:
        found = re.search(r"--system-config='([^']*)'", command)
        if found:
            return json.loads(found.group(1))
    return {}


def cluster_config(root: Path) -> RecConfig:
    """The small test config with serve.yaml's serving section (no GPU here: the ranker asks
    for the custom resource alone) and HNSW shards, as a large catalogue would have."""
    config = small_config(root, "split")
    serving = {**config.serving.model_dump(), **layout()["serving"], "ranker_num_gpus": 0.0}
    config.serving = type(config.serving).model_validate(serving)
    config.serving.reload_poll_s = 0.2
    config.recall.index = "hnsw"
    config.checkpoint.every_s = None  # no periodic checkpoint job in the tier's few minutes
    return config


@pytest.fixture(scope="module")
def cluster():
    set_process_env()
    # Serve keeps a stopping ingress replica's direct-ingress port open 30 s for a load
    # balancer to notice; nothing balances here, and each app's deletion would wait it out.
    os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "1"
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
    spec = layout()
    t0 = time.perf_counter()
    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "object_store_memory": 128 * MiB,
            "include_dashboard": False,
            "gcs_server_port": _free_port(),
            "dashboard_agent_listen_port": _free_port(),
            "_system_config": spec["system_config"],
        },
    )
    try:
        nodes = {
            "head": c.head_node,
            "a": c.add_node(num_cpus=1, resources=spec["a"], object_store_memory=96 * MiB),
            "b": c.add_node(num_cpus=2, resources=spec["b"], object_store_memory=96 * MiB),
        }
        c.wait_for_nodes(timeout=START_TIMEOUT_S)
        ray.init(address=c.address, logging_level="ERROR")
        port = _free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        print(f"\n[cluster] 3 nodes and Serve up in {time.perf_counter() - t0:.1f} s")
        yield {
            "url": f"http://127.0.0.1:{port}",
            "nodes": {name: n.node_id for name, n in nodes.items()},
            "raylets": {name: raylet_pid(n) for name, n in nodes.items()},
            "handles": nodes,
        }
    finally:
        # The whole cluster goes: no graceful Serve shutdown (after a node loss the controller
        # waits 30 s for replicas it cannot place); this process forgets its controller.
        from ray.serve.context import _disconnect

        _disconnect()
        ray.shutdown()
        for node in list(c.worker_nodes):  # a node whose raylet a test killed: the rest of it
            with contextlib.suppress(Exception):
                c.remove_node(node, allow_graceful=False)
        c.shutdown()


def raylet_pid(node) -> int:
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def kill_raylet(cluster: dict, name: str) -> None:
    """SIGKILL one node's raylet, as a machine's loss looks to the rest of the cluster."""
    import os

    os.kill(cluster["raylets"][name], signal.SIGKILL)


@pytest.fixture(scope="module")
def stack(cluster, tmp_path_factory):
    """The split app across the cluster, on a fresh data dir: data in the log, a first model
    published; `ingress` maps each worker node to the direct HTTP URL of its ingress replica."""
    import ray

    from deployments.app import deploy
    from deployments.eventlog import get_or_create_log

    root = tmp_path_factory.mktemp("cluster")
    config = cluster_config(root)
    replicas = layout()["replicas"]
    ds = live_dataset(seed=5)
    records = ds.item_records() + ds.event_records()
    t0 = time.perf_counter()
    log = get_or_create_log(config.log_dir, config.eventlog)
    ray.get(log.append.remote(records), timeout=START_TIMEOUT_S)
    model = train(snapshot_table(records), config)
    model.save(config.model_dir, model.build_index(config.recall, config.serving.ann_shards))
    publish(config.model_dir, model.version)
    deploy(config, replicas=replicas["Aggregator"], stage_replicas=replicas["ProfileStage"])
    client = httpx.Client(base_url=cluster["url"], timeout=30, headers=ADMIN)
    wait_for(lambda: _ready(client), timeout_s=START_TIMEOUT_S, interval_s=0.5)
    ingress = wait_for(lambda: ingress_urls(cluster), timeout_s=60, interval_s=0.5)
    direct = {
        name: httpx.Client(base_url=url, timeout=30, headers=ADMIN) for name, url in ingress.items()
    }
    for c in direct.values():
        wait_for(lambda c=c: _ready(c), timeout_s=START_TIMEOUT_S, interval_s=0.5)
    print(f"[cluster] app deployed and ready in {time.perf_counter() - t0:.1f} s: {placement()}")
    yield {
        "client": client,
        "direct": direct,
        "config": config,
        "model": model,
        "log": log,
    }
    client.close()
    for c in direct.values():
        c.close()


def placement() -> dict[str, list[str]]:
    """Where each live actor runs: actor name (replicas by deployment) -> node ids."""
    import ray

    out: dict[str, list[str]] = {}
    for info in ray._private.state.actors().values():
        if info["State"] != "ALIVE" or not info.get("Name"):
            continue
        name = info["Name"]
        if name.startswith("SERVE_REPLICA::"):
            name = name.split("#")[1]  # SERVE_REPLICA::app#Deployment#id
        out.setdefault(name, []).append(info["Address"]["NodeID"])
    return out


def node_names(cluster: dict) -> dict[str, str]:
    return {node: name for name, node in cluster["nodes"].items()}


def placed(cluster: dict) -> dict[str, list[str]]:
    """`placement()` with node ids as 'head', 'a', 'b'."""
    names = node_names(cluster)
    return {actor: sorted(names.get(n, n) for n in nodes) for actor, nodes in placement().items()}


def ingress_urls(cluster: dict) -> dict[str, str] | None:
    """Each worker node's ingress replica's direct HTTP URL (Serve's throughput mode serves
    every ingress replica on a port of its own: `deployments.cli.direct_targets`); None until
    both replicas have one."""
    import ray
    from ray.serve.context import _get_global_client

    groups = ray.get(_get_global_client()._controller.get_target_groups.remote(), timeout=10)
    by_actor = {}
    for info in ray._private.state.actors().values():
        if info["State"] == "ALIVE" and info.get("Name"):
            by_actor[info["Name"]] = info["Address"]["NodeID"]
    names = node_names(cluster)
    out = {}
    for group in groups:
        if group.protocol != "HTTP" or group.app_name != "rec":
            continue
        for t in group.targets:
            node = names.get(by_actor.get(t.name, ""))
            if node is not None:
                out[node] = f"http://127.0.0.1:{t.port}"
    return out if set(out) == {"a", "b"} else None
