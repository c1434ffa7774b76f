"""The files engineers edit to deploy and scale: they must parse and mean what they say."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from rec.config import RecConfig

ROOT = Path(__file__).resolve().parents[2]


def test_rec_yaml_is_the_defaults_with_a_cluster_data_dir() -> None:
    config = RecConfig.from_yaml(ROOT / "configs" / "rec.yaml")
    assert str(config.data_dir) == "/var/lib/rec"
    assert config.model_dump(exclude={"data_dir"}) == RecConfig().model_dump(exclude={"data_dir"})


def test_serve_yaml_is_a_valid_serve_config() -> None:
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(
        yaml.safe_load((ROOT / "configs/serve.yaml").read_text())
    )
    app = schema.applications[0]
    assert app.import_path == "deployments.app:app_builder"
    assert {d.name for d in app.deployments} == {
        "Aggregator",
        "ProfileStage",
        "RecallStage",
        "RankerStage",
    }


def test_serve_yaml_states_the_admission_limits_the_code_uses() -> None:
    from deployments.runtime import INGRESS_MAX_ONGOING, MAX_ONGOING, MAX_QUEUED

    app = yaml.safe_load((ROOT / "configs/serve.yaml").read_text())["applications"][0]
    topology = RecConfig.model_validate({"serving": app["args"]["serving"]}).serving.topology
    limits = {d["name"]: d for d in app["deployments"]}
    assert limits["Aggregator"]["max_ongoing_requests"] == INGRESS_MAX_ONGOING[topology]
    assert limits["Aggregator"]["max_queued_requests"] == MAX_QUEUED
    for stage in ("ProfileStage", "RecallStage", "RankerStage"):
        assert limits[stage]["max_ongoing_requests"] == MAX_ONGOING


def test_serve_yaml_deploys_the_stream_app_as_the_code_does() -> None:
    from deployments.push import APP_NAME, HEADROOM, ROUTE

    rec, stream = yaml.safe_load((ROOT / "configs/serve.yaml").read_text())["applications"]
    assert (stream["name"], stream["route_prefix"]) == (APP_NAME, ROUTE)
    assert stream["import_path"] == "deployments.app:push_builder"
    assert stream["args"] == rec["args"]
    config = RecConfig.model_validate({"serving": rec["args"]["serving"]})
    (pusher,) = stream["deployments"]
    assert pusher["max_ongoing_requests"] == config.serving.max_streams + HEADROOM
    assert pusher["max_queued_requests"] == config.serving.max_streams


def test_serve_and_cluster_yaml_describe_one_layout() -> None:
    """What tests/cluster deploys on one machine: serve.yaml's serving settings are a valid
    split config whose placement resources the cluster's node types declare (the ranker's on
    the GPU type alone, the other replicas' on every worker type, nothing on the head), with
    enough CPU workers for the replicas spread one per node; placement is not overridden by
    ray_actor_options (which would replace the code's whole)."""
    serve = yaml.safe_load((ROOT / "configs/serve.yaml").read_text())
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    app = serve["applications"][0]
    config = RecConfig.model_validate({"serving": app["args"]["serving"]})
    s = config.serving
    assert s.topology == "split" and s.ann_shards >= 2 and s.ranker_num_gpus >= 1
    assert serve["proxy_location"] == "HeadOnly"
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]["resources"]
    cpu, gpu = types["cpu_worker"]["resources"], types["gpu_worker"]["resources"]
    for name, amount in s.ranker_resources.items():
        assert gpu.get(name, 0) >= amount and name not in cpu and name not in head
    assert s.replica_resources
    for name, amount in s.replica_resources.items():
        assert cpu.get(name, 0) >= amount and gpu.get(name, 0) >= amount and name not in head
    replicas = {d["name"]: d for d in app["deployments"]}
    assert not any("ray_actor_options" in d for d in replicas.values())
    if s.max_replicas_per_node:
        most = max(
            replicas[n]["num_replicas"] for n in ("Aggregator", "ProfileStage", "RecallStage")
        )
        workers = types["cpu_worker"]["min_workers"] + types["gpu_worker"]["min_workers"]
        assert workers * s.max_replicas_per_node >= most
    rankers_per_node = min(gpu[name] // amount for name, amount in s.ranker_resources.items())
    assert (
        types["gpu_worker"]["min_workers"] * rankers_per_node
        >= replicas["RankerStage"]["num_replicas"]
    )


def test_cluster_yaml_head_system_config_is_json() -> None:
    from tests.cluster.conftest import head_system_config

    system = head_system_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    assert system["health_check_period_ms"] * system["health_check_failure_threshold"] <= 10_000


def test_cluster_yaml_has_head_cpu_and_gpu_workers() -> None:
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    assert types["gpu_worker"]["resources"]["GPU"] == 1
    assert types["cpu_worker"]["max_workers"] > types["cpu_worker"]["min_workers"]
    assert any("serve deploy configs/serve.yaml" in c for c in cluster["head_start_ray_commands"])


def test_cluster_yaml_passes_the_launchers_own_validation() -> None:
    """What `ray up` runs before it starts a node: the defaults filled in, then the schema
    (no unknown keys, right types) and the node-type checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(yaml.safe_load((ROOT / "cluster.yaml").read_text())))


def test_rec_never_imports_ray() -> None:
    for path in (ROOT / "rec").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n == "ray" or n.startswith("ray.") for n in names), path
            assert not any(n.startswith("deployments") for n in names), path


def test_configuration_reference_is_current() -> None:
    """docs/configuration.md is generated from RecConfig: regenerate it after changing a field
    (`python -m rec.config > docs/configuration.md`)."""
    from rec.config import reference_markdown

    assert (ROOT / "docs/configuration.md").read_text() == reference_markdown() + "\n"


def test_the_grafana_dashboard_plots_every_metric() -> None:
    """docs/grafana/rec.json queries each metric deployments/telemetry.py defines, by the name
    Ray's exporter gives it (its namespace "ray_" first)."""
    import json
    import re

    names = set(re.findall(r'"(rec_[a-z_]+)"', (ROOT / "deployments/telemetry.py").read_text()))
    assert len(names) >= 12
    dashboard = json.loads((ROOT / "docs/grafana/rec.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    missing = {n for n in names if not re.search(rf"\bray_{n}(_bucket)?\b", exprs)}
    assert not missing


def _deployments(app) -> list:
    """Every deployment an application binds, the ingress first."""
    from ray.serve import Application

    bound = app._bound_deployment
    return [bound] + [
        d for a in bound.init_args if isinstance(a, Application) for d in _deployments(a)
    ]


def test_every_replica_is_health_checked_on_the_configured_period() -> None:
    from deployments.app import build_app
    from deployments.push import build_push

    for topology, names in (
        ("fused", {"Aggregator"}),
        ("split", {"Aggregator", "ProfileStage", "RecallStage", "RankerStage"}),
    ):
        config = RecConfig.model_validate(
            {"serving": {"topology": topology, "health_check_period_s": 1.5}}
        )
        built = _deployments(build_app(config, log=object())) + _deployments(
            build_push(config, object())
        )
        assert {d.name for d in built} == names | {"Pusher"}
        assert {d._deployment_config.health_check_period_s for d in built} == {1.5}
