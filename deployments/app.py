"""Builds the Serve application from a `RecConfig`: fused (one ingress running every stage)
or split (Aggregator -> Profile -> Recall -> Ranker), chosen by `serving.topology`.

Placement (`serving.replica_resources`, `ranker_resources`, `max_replicas_per_node`) is set
here from the config, not in a Serve config file's `ray_actor_options`, which would replace
these options whole (resources and the process environment of `runtime.ENV` with them)."""

from __future__ import annotations

from pathlib import Path

from ray.serve import Application

from deployments.eventlog import get_or_create_log
from deployments.ingress import Aggregator
from deployments.push import APP_NAME as PUSH_APP
from deployments.push import REC_APP, build_push
from deployments.push import ROUTE as PUSH_ROUTE
from deployments.runtime import (
    INGRESS_MAX_ONGOING,
    MAX_ONGOING,
    MAX_QUEUED,
    actor_options,
    serve_options,
)
from deployments.stages import ProfileStage, RankerStage, RecallStage
from deployments.trainer import get_or_create_trainer
from rec.config import RecConfig


def build_app(
    config: RecConfig, log=None, trainer=None, replicas: int = 1, stage_replicas: int = 1
) -> Application:
    """The Serve app with `replicas` ingress replicas (and, split, `stage_replicas` replicas of
    the profile and recall deployments, one ranker replica). Without `log`/`trainer` (a test
    may pass stand-ins) it creates the EventLog and Trainer actors, on the head node."""
    if log is None:
        log = get_or_create_log(config.log_dir, config.eventlog)
        trainer = get_or_create_trainer(config)
    cfg = config.model_dump(mode="json")
    s = config.serving
    common = serve_options(s)

    def opts(num_replicas: int) -> dict:
        return {
            "num_replicas": num_replicas,
            "ray_actor_options": actor_options(s.replica_cpus, resources=s.replica_resources),
            "max_ongoing_requests": MAX_ONGOING,
            **common,
        }

    ingress = Aggregator.options(
        num_replicas=replicas,
        max_queued_requests=MAX_QUEUED,
        ray_actor_options=actor_options(s.replica_cpus, resources=s.replica_resources),
        max_ongoing_requests=INGRESS_MAX_ONGOING[s.topology],
        **common,
    )
    if s.topology == "fused":
        return ingress.bind(cfg, log, trainer=trainer)
    profile = ProfileStage.options(**opts(stage_replicas)).bind(cfg, log)
    recall = RecallStage.options(**opts(stage_replicas)).bind(cfg, log)
    ranker = RankerStage.options(
        ray_actor_options=actor_options(s.replica_cpus, s.ranker_num_gpus, s.ranker_resources),
        max_ongoing_requests=MAX_ONGOING,
        **serve_options(s, spread=False),  # GPU replicas go where the GPUs are
    ).bind(cfg)
    return ingress.bind(cfg, log, profile, recall, ranker, trainer=trainer)


def merged(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` applied, nested dicts merged key by key."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def config_from_args(args: dict) -> RecConfig:
    """A `serve deploy` application's args: {config: path/to/rec.yaml, and any RecConfig
    sections to override, e.g. serving: {topology: split}}, merged key by key."""
    path = args.get("config")
    config = RecConfig.from_yaml(Path(path)) if path else RecConfig()
    overrides = {k: v for k, v in args.items() if k != "config"}
    if overrides:
        config = RecConfig.model_validate(merged(config.model_dump(mode="json"), overrides))
    return config


def app_builder(args: dict) -> Application:
    """Entry point of the rec application for `serve run` / `serve deploy`."""
    return build_app(config_from_args(args))


def push_builder(args: dict) -> Application:
    """Entry point of the /stream application (deployments.push), the same args as rec's."""
    return build_push(config_from_args(args))


def deploy(config: RecConfig, replicas: int = 1, **build) -> None:
    """Run both applications on the Serve instance started: rec at / (`replicas` ingress
    replicas; `build`: build_app's other arguments) and /stream."""
    from ray import serve

    serve.run(
        build_app(config, replicas=replicas, **build),
        name=REC_APP,
        route_prefix="/",
        blocking=False,
    )
    serve.run(
        build_push(config, build.get("log")), name=PUSH_APP, route_prefix=PUSH_ROUTE, blocking=False
    )


def undeploy() -> None:
    from ray import serve

    for name in (PUSH_APP, REC_APP):
        serve.delete(name)
