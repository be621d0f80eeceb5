"""``GET /metrics`` (Prometheus text format) and the web's own metrics.

The answer adds up every process of the service: under the Procfile each one
writes its values to ``PROMETHEUS_MULTIPROC_DIR`` (see ``orchestrator.metrics``)
and this view merges the directory, so any gunicorn worker answers for all of
them and for the Celery workers. Queue gauges are read from the database at
each scrape. With ``METRICS_TOKEN`` set the route wants that bearer token.

Recorded here, once per request in an ``after_request`` hook:
``orchestrator_http_request_duration_seconds{route,method,status}`` (``route``
is the URL rule's template, ``/v1/jobs/<job_id>``, never the path, so ids do
not become labels) and ``orchestrator_callbacks_total{outcome}`` for
``POST /functions/v1/job-callback``.
"""
from __future__ import annotations

import hmac
import time
from typing import Any, Iterator

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest, multiprocess
from prometheus_client.metrics_core import Metric

from orchestrator import metrics
from orchestrator.errors import Unauthorized
from web.openapi import Reply, spec
from web.services import services

bp = Blueprint("metrics", __name__)

CALLBACK_ENDPOINT = "functions.job_callback"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: Callback answers by status, when the view did not say (it says applied/ignored).
CALLBACK_STATUS = {401: "rejected_auth", 404: "not_found", 409: "conflict", 503: "unavailable"}

HTTP_DURATION = Histogram("orchestrator_http_request_duration_seconds",
                          "HTTP requests by route template, method and status",
                          ["route", "method", "status"])
CALLBACKS = Counter("orchestrator_callbacks", "Worker callbacks (job-callback) by outcome",
                    ["outcome"])


class _ThisProcess:
    """The process's default registry, when there is no shared directory."""

    def collect(self) -> Iterator[Metric]:
        return REGISTRY.collect()


def build_registry(app: Flask) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    directory = metrics.multiprocess_dir()
    if directory is not None:
        multiprocess.MultiProcessCollector(registry, path=str(directory))
    else:
        registry.register(_ThisProcess())  # type: ignore[arg-type]
    registry.register(metrics.QueueCollector(app.extensions["orchestrator"].db))
    return registry


def callback_outcome(response: Any) -> str:
    outcome = g.get("callback_outcome")
    if outcome:
        return str(outcome)
    status = response.status_code
    if response.headers.get("Idempotent-Replayed"):
        return "replayed"
    if status in CALLBACK_STATUS:
        return CALLBACK_STATUS[status]
    if 400 <= status < 500:
        return "invalid"
    return "error" if status >= 500 else "applied"


def init_app(app: Flask) -> None:
    app.extensions["metrics_registry"] = build_registry(app)
    app.register_blueprint(bp)

    def _start() -> None:
        g.metrics_started = time.perf_counter()

    # First of all: a request another hook answers early (a rate limit) is timed too.
    app.before_request_funcs.setdefault(None, []).insert(0, _start)

    @app.after_request
    def _observe(response: Any) -> Any:
        started = g.pop("metrics_started", None)
        if started is not None:
            rule = request.url_rule
            method = request.method if request.method in METHODS else "OTHER"
            HTTP_DURATION.labels(route=rule.rule if rule is not None else "unmatched", method=method,
                                 status=str(response.status_code)
                                 ).observe(time.perf_counter() - started)
        if request.endpoint == CALLBACK_ENDPOINT:
            CALLBACKS.labels(outcome=callback_outcome(response)).inc()
        return response


@bp.get("/metrics")
@spec(summary="Prometheus metrics of the whole service", tags=["meta"], errors=(401,), responses={
    200: Reply(description="Prometheus text exposition format",
               content={"text/plain": {"type": "string"}})}, description=(
    "Counters and histograms of every web and worker process (added up through "
    "`PROMETHEUS_MULTIPROC_DIR`), queue gauges read from the database at each scrape. Public "
    "unless `METRICS_TOKEN` is set; then `Authorization: Bearer <METRICS_TOKEN>` (else 401)."))
def metrics_view() -> Any:
    token = services().settings.metrics_token
    if token:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 token.encode()):
            raise Unauthorized("Metrics token required")
    body = generate_latest(current_app.extensions["metrics_registry"])
    return Response(body, headers={"Content-Type": CONTENT_TYPE_LATEST})
