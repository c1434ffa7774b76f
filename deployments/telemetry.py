"""Prometheus metrics, through Ray's metrics API: `ray.serve.metrics` in Serve replicas (they
add the deployment and replica tags), `ray.util.metrics` in the log and trainer actors. Ray's
metrics agent on each node exports them (`rec serve --metrics-port`, default 8080); every name
starts with `rec_`. One object per process holds them, created on first use.

Serve's own metrics sit beside these (`ray_serve_*`: requests, latency, and the 503s its
admission answers before a request reaches rec's code).
"""

from __future__ import annotations

import functools

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.serve import metrics as serve_metrics
from ray.util import metrics as ray_metrics

LATENCY_MS = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000]
STAGES = ("profile", "recall", "rank", "finalize")


class Serving:
    """What an ingress or stage replica reports."""

    def __init__(self) -> None:
        self.stage_ms = serve_metrics.Histogram(
            "rec_stage_latency_ms",
            description="Time a /recommend spends in each stage (profile, recall, rank, finalize).",
            boundaries=LATENCY_MS,
            tag_keys=("stage",),
        )
        self.answers = serve_metrics.Counter(
            "rec_answers_total",
            description="/recommend answers, per served ordering (ranker, gf, ease, ann, blend, live).",
            tag_keys=("ordering",),
        )
        self.source_items = serve_metrics.Counter(
            "rec_answer_items_total",
            description="Items in /recommend answers, per recall source that found them.",
            tag_keys=("source",),
        )
        self.events = serve_metrics.Counter(
            "rec_events_ingested_total",
            description="Events acknowledged by POST /events, per type.",
            tag_keys=("type",),
        )
        self.impressions = serve_metrics.Counter(
            "rec_impressions_total", description="Items shown, logged as training feedback."
        )
        self.errors = serve_metrics.Counter(
            "rec_http_errors_total",
            description="Error answers rec's code gave, per status (4xx, 5xx, 503).",
            tag_keys=("status",),
        )
        self.applied = serve_metrics.Gauge(
            "rec_follower_offset",
            description="Log offset up to which this replica applied the log (lag: "
            "rec_log_head minus this).",
            tag_keys=("part",),
        )
        self.served = serve_metrics.Gauge(
            "rec_served_model",
            description="1 for the model version this replica serves.",
            tag_keys=("version",),
        )
        self._version: str | None = None

    def serving(self, version: str | None) -> None:
        if version != self._version:
            if self._version is not None:
                self.served.set(0, tags={"version": self._version})
            if version is not None:
                self.served.set(1, tags={"version": version})
            self._version = version


class Push:
    """What a GET /stream replica (deployments.push) reports."""

    def __init__(self) -> None:
        self.streams = serve_metrics.Gauge(
            "rec_streams_open", description="GET /stream connections open on this replica."
        )
        self.pushes = serve_metrics.Counter(
            "rec_pushes_total",
            description="Lists sent on streams, per trigger (connect, events, catalog, model).",
            tag_keys=("trigger",),
        )


class Log:
    """What the event log actor reports."""

    def __init__(self) -> None:
        self.head = ray_metrics.Gauge(
            "rec_log_head", description="The log's next offset (records ever appended)."
        )
        self.records = ray_metrics.Counter(
            "rec_log_records_total",
            description="Records appended to the log, per kind.",
            tag_keys=("kind",),
        )


class Training:
    """What the trainer actor reports."""

    def __init__(self) -> None:
        self.seconds = ray_metrics.Gauge(
            "rec_retrain_seconds", description="How long the last published retrain took."
        )
        self.runs = ray_metrics.Counter(
            "rec_retrains_total",
            description="Retrains, per result (published, skipped, failed).",
            tag_keys=("result",),
        )
        self.published = ray_metrics.Gauge(
            "rec_published_model",
            description="1 for the model version last published.",
            tag_keys=("version",),
        )


@functools.cache
def serving() -> Serving:
    return Serving()


@functools.cache
def push() -> Push:
    return Push()


@functools.cache
def log() -> Log:
    return Log()


@functools.cache
def training() -> Training:
    return Training()


def count_errors(api: FastAPI) -> None:
    """Count the error answers of `api`'s routes in rec_http_errors_total, per status."""

    @api.exception_handler(HTTPException)
    async def _counted_http_error(request: Request, exc: HTTPException):
        serving().errors.inc(tags={"status": str(exc.status_code)})
        return await http_exception_handler(request, exc)

    @api.exception_handler(RequestValidationError)
    async def _counted_validation_error(request: Request, exc: RequestValidationError):
        serving().errors.inc(tags={"status": "422"})
        return await request_validation_exception_handler(request, exc)

    @api.exception_handler(Exception)
    async def _counted_server_error(request: Request, exc: Exception):
        """Starlette answers with this and then re-raises the exception, which Serve logs."""
        serving().errors.inc(tags={"status": "500"})
        return JSONResponse({"detail": "internal error"}, status_code=500)
