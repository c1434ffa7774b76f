"""Builds the Serve application from a `RecConfig`: fused (one ingress running every stage)
or split (Aggregator -> Profile -> Recall -> Ranker), chosen by `serving.topology`."""

from __future__ import annotations

from pathlib import Path

from ray.serve import Application

from deployments.eventlog import get_or_create_log
from deployments.ingress import Aggregator
from deployments.runtime import INGRESS_MAX_ONGOING, MAX_ONGOING, MAX_QUEUED, actor_options
from deployments.stages import ProfileStage, RankerStage, RecallStage
from deployments.trainer import get_or_create_trainer
from rec.config import RecConfig


def build_app(config: RecConfig, log=None, trainer=None, replicas: int = 1) -> Application:
    """The Serve app with `replicas` ingress replicas. Without `log`/`trainer` (a test may pass
    stand-ins) it creates the EventLog and Trainer actors."""
    if log is None:
        log = get_or_create_log(config.log_dir, config.eventlog)
        trainer = get_or_create_trainer(config)
    cfg = config.model_dump(mode="json")
    s = config.serving

    def opts(num_gpus: float = 0.0) -> dict:
        return {
            "ray_actor_options": actor_options(s.replica_cpus, num_gpus),
            "max_ongoing_requests": MAX_ONGOING,
        }

    ingress = Aggregator.options(
        num_replicas=replicas,
        max_queued_requests=MAX_QUEUED,
        ray_actor_options=actor_options(s.replica_cpus),
        max_ongoing_requests=INGRESS_MAX_ONGOING[s.topology],
    )
    if s.topology == "fused":
        return ingress.bind(cfg, log, trainer=trainer)
    profile = ProfileStage.options(**opts()).bind(cfg, log)
    recall = RecallStage.options(**opts()).bind(cfg, log)
    ranker = RankerStage.options(**opts(s.ranker_num_gpus)).bind(cfg)
    return ingress.bind(cfg, log, profile, recall, ranker, trainer=trainer)


def app_builder(args: dict) -> Application:
    """Entry point for `serve run` / `serve deploy`: args {config: path/to/rec.yaml}."""
    path = args.get("config")
    config = RecConfig.from_yaml(Path(path)) if path else RecConfig()
    overrides = {k: v for k, v in args.items() if k != "config"}
    if overrides:
        config = RecConfig.model_validate({**config.model_dump(mode="json"), **overrides})
    return build_app(config)
