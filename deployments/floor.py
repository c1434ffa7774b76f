"""The floor: a bare Serve deployment that answers a constant JSON, deployed beside rec on the
same Ray instance, behind the same proxy and with the same replica settings (`rec serve
--floor`, route /floor). Load tests measure it in the same run as rec: its throughput is the
ceiling Serve itself puts on this machine, whatever the recommender does."""

from __future__ import annotations

from ray import serve
from ray.serve import Application

from deployments.runtime import INGRESS_MAX_ONGOING, MAX_QUEUED, actor_options

ROUTE = "/floor"
APP_NAME = "floor"


@serve.deployment
class Floor:
    async def __call__(self, _request) -> dict:
        return {"ok": True}


def build_floor(replica_cpus: float, replicas: int = 1) -> Application:
    """The same options as rec's (default, fused) ingress (deployments.app.build_app)."""
    return Floor.options(
        num_replicas=replicas,
        ray_actor_options=actor_options(replica_cpus),
        max_ongoing_requests=INGRESS_MAX_ONGOING["fused"],
        max_queued_requests=MAX_QUEUED,
    ).bind()
