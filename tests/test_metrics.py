"""``GET /metrics``: job counters where transitions commit, histograms, queue
gauges from the database, callback outcomes, request latency by route template.

In-process (one process, deltas of its default registry) on both databases, then
on real processes: two gunicorn workers and two Celery workers write to one
``PROMETHEUS_MULTIPROC_DIR`` and any web worker answers for all of them.
"""
from __future__ import annotations

import re
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.config import Settings
from orchestrator.models import Job
from tests.stack import Stack, make_stack

CALLBACK = "/functions/v1/job-callback"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Exposition text → {(sample name, labels): value}; every family parsed."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum over the series of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for (n, lab), v in samples.items():
        if n == name:
            out[dict(lab)[label]] += v
    return {k: v for k, v in out.items() if v}


def delta(after: Samples, before: Samples, name: str, label: str) -> dict[str, float]:
    a, b = by_label(after, name, label), by_label(before, name, label)
    return {k: a.get(k, 0) - b.get(k, 0) for k in a if a.get(k, 0) - b.get(k, 0)}


# --- in process ---------------------------------------------------------------------------------


def _scrape(client: Any) -> Samples:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    return parse(r.get_data(as_text=True))


def _queue(client: Any, headers: dict[str, str], job_type: str) -> str:
    r = client.post("/functions/v1/queue-job", headers=headers,
                    json={"jobType": job_type, "metadata": {"prompt": "a lighthouse"}})
    assert r.status_code == 200, r.get_data(as_text=True)
    return r.get_json()["job"]["id"]


def test_in_process_metrics(client: Any, make_user: Callable[..., Any],
                            worker_headers: dict[str, str], db: Any) -> None:
    before = _scrape(client)
    user_id, headers = make_user()
    cancelled, failed, done, waiting = (_queue(client, headers, t) for t in
                                        ("sdxl_image_fast", "sdxl_image_high", "image_fast",
                                         "image_fast"))
    assert client.post(f"/v1/jobs/{cancelled}/cancel", headers=headers).status_code == 200
    outcomes = [
        (worker_headers, {"job_id": failed, "status": "failed", "error_message": "boom"}, 200),
        (worker_headers, {"job_id": failed, "status": "failed", "error_message": "boom"}, 200),
        (worker_headers, {"job_id": done, "status": "processing"}, 200),
        (worker_headers, {"job_id": done, "status": "processing"}, 200),
        (worker_headers, {"job_id": done, "status": "completed",
                          "assets": [f"{user_id}/{done}_0.png"]}, 200),
        ({"Authorization": "Bearer wrong"}, {"job_id": done, "status": "failed"}, 401),
        (worker_headers, {"job_id": str(uuid.uuid4()), "status": "failed"}, 404),
        (worker_headers, {"job_id": done, "status": "exploded"}, 400),
    ]
    for auth, body, status in outcomes:
        assert client.post(CALLBACK, headers=auth, json=body).status_code == status
    time.sleep(0.05)
    after = _scrape(client)

    assert delta(after, before, "orchestrator_jobs_created_total", "job_type") == {
        "sdxl_image_fast": 1, "sdxl_image_high": 1, "image_fast": 2}
    assert delta(after, before, "orchestrator_jobs_finished_total", "status") == {
        "cancelled": 1, "failed": 1, "completed": 1}
    assert delta(after, before, "orchestrator_job_queue_wait_seconds_count", "job_type") == {
        "image_fast": 1}  # the one claim (the processing callback); renewals are not starts
    assert delta(after, before, "orchestrator_job_run_seconds_count", "job_type") == {
        "image_fast": 1}
    assert delta(after, before, "orchestrator_callbacks_total", "outcome") == {
        "applied": 4, "ignored": 1, "rejected_auth": 1, "not_found": 1, "invalid": 1}
    # Gauges: this test's database state (the fixture emptied it), read at the scrape.
    assert value(after, "orchestrator_queue_depth", family="wan") == 1
    assert value(after, "orchestrator_queue_depth", family="sdxl") == 0
    assert value(after, "orchestrator_jobs_running", family="wan") == 0
    assert value(after, "orchestrator_queue_oldest_wait_seconds", family="wan") > 0
    assert value(after, "orchestrator_queue_stats_up") == 1
    with db.session() as s:
        assert s.get(Job, waiting).status == "queued"
    # Latency by route template: never a raw path with an id in it.
    queue_job = ("orchestrator_http_request_duration_seconds_count",
                 frozenset({("route", "/functions/v1/queue-job"), ("method", "POST"),
                            ("status", "200")}))
    assert after[queue_job] - before.get(queue_job, 0) == 4
    assert value(after, "orchestrator_http_request_duration_seconds_count",
                 route="/v1/jobs/<job_id>/cancel", method="POST", status="200") >= 1
    routes = {dict(lab).get("route", "") for (_, lab) in after}
    assert not any(UUID.search(r) for r in routes)


def test_metrics_token(settings: Settings, db: Any, redis_client: Any) -> None:
    from dataclasses import replace

    from web import create_app

    app = create_app(replace(settings, metrics_token="scrape-me"), publisher=lambda *_: None)
    client = app.test_client()
    try:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        ok = client.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
        assert ok.status_code == 200 and b"orchestrator_queue_depth" in ok.data
    finally:
        app.extensions["orchestrator"].db.dispose()


# --- real processes -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    var = tmp_path_factory.mktemp("metrics-stack")
    s = make_stack("postgres-redis", var, ("web", "worker_sdxl", "worker_wan"), private_redis=True,
                   GENERATION_TIME_SCALE="0.05", MAX_ATTEMPTS="1", ORCHESTRATOR_FAULTS="1",
                   PROMETHEUS_MULTIPROC_DIR=str(var / "metrics"))
    with s.running():
        yield s


def _stack_scrape(stack: Stack) -> Samples:
    r = requests.get(f"{stack.base_url}/metrics", timeout=10)
    assert r.status_code == 200
    return parse(r.text)


@pytest.mark.e2e
def test_metrics_add_up_every_process(stack: Stack) -> None:
    """Two web workers, two Celery workers: the counters are exactly this test's jobs."""
    user_id, headers = stack.user()
    worker = {"Authorization": f"Bearer {stack.env.get('WORKER_TOKEN') or 'dev-worker-token-change-me'}"}

    def submit(job_type: str, **metadata: Any) -> str:
        r = stack.submit(headers, job_type, **metadata)
        assert r.status_code == 200, r.text
        return r.json()["job"]["id"]

    # sdxl (one worker, one job at a time): the second waits behind the first and is cancelled.
    s1 = submit("sdxl_image_fast")
    s2 = submit("sdxl_image_fast")
    cancel = requests.post(f"{stack.base_url}/v1/jobs/{s2}/cancel", headers=headers, timeout=10)
    assert cancel.status_code == 200 and cancel.json()["status"] == "cancelled"
    s3 = submit("sdxl_image_high")
    # wan: one completes, one fails in the worker (an injected error, no attempts left), and
    # one waiting behind them is failed by an external worker's callback through the web.
    w1 = submit("image_fast")
    w2 = submit("image_fast", fault="transient:1")
    w3 = submit("image_high")
    fail = requests.post(f"{stack.base_url}{CALLBACK}", headers=worker, timeout=10,
                         json={"job_id": w3, "status": "failed", "error_message": "gpu on fire"})
    assert fail.status_code == 200 and fail.json()["status"] == "failed"
    again = requests.post(f"{stack.base_url}{CALLBACK}", headers=worker, timeout=10,
                          json={"job_id": w3, "status": "failed", "error_message": "gpu on fire"})
    assert again.status_code == 200
    refused = requests.post(f"{stack.base_url}{CALLBACK}", timeout=10,
                            headers={"Authorization": "Bearer wrong"},
                            json={"job_id": w3, "status": "failed"})
    assert refused.status_code == 401

    jobs = stack.wait_for(headers, [s1, s2, s3, w1, w2, w3], timeout=90)
    assert {k: j["status"] for k, j in jobs.items()} == {
        s1: "completed", s2: "cancelled", s3: "completed", w1: "completed", w2: "failed",
        w3: "failed"}
    # The workers finish their bookkeeping (the skipped deliveries of s2 and w3) quickly;
    # the gauges must come back to zero.
    deadline = time.monotonic() + 30
    while True:
        m = _stack_scrape(stack)
        if (by_label(m, "orchestrator_queue_depth", "family") == {}
                and by_label(m, "orchestrator_jobs_running", "family") == {}) \
                or time.monotonic() > deadline:
            break
        time.sleep(0.3)

    assert by_label(m, "orchestrator_jobs_created_total", "job_type") == {
        "sdxl_image_fast": 2, "sdxl_image_high": 1, "image_fast": 2, "image_high": 1}
    finished = {(dict(lab)["job_type"], dict(lab)["status"]): v for (n, lab), v in m.items()
                if n == "orchestrator_jobs_finished_total" and v}
    assert finished == {("sdxl_image_fast", "completed"): 1, ("sdxl_image_fast", "cancelled"): 1,
                        ("sdxl_image_high", "completed"): 1, ("image_fast", "completed"): 1,
                        ("image_fast", "failed"): 1, ("image_high", "failed"): 1}
    # Started: s1, s3, w1, w2 (the cancelled and the callback-failed job never ran).
    assert by_label(m, "orchestrator_job_queue_wait_seconds_count", "job_type") == {
        "sdxl_image_fast": 1, "sdxl_image_high": 1, "image_fast": 2}
    assert by_label(m, "orchestrator_job_run_seconds_count", "job_type") == {
        "sdxl_image_fast": 1, "sdxl_image_high": 1, "image_fast": 1}
    assert value(m, "orchestrator_job_run_seconds_sum", job_type="sdxl_image_high") > 0
    assert by_label(m, "orchestrator_callbacks_total", "outcome") == {
        "applied": 1, "ignored": 1, "rejected_auth": 1}
    for family in ("sdxl", "wan"):
        assert value(m, "orchestrator_queue_depth", family=family) == 0
        assert value(m, "orchestrator_jobs_running", family=family) == 0
        assert value(m, "orchestrator_queue_oldest_wait_seconds", family=family) == 0
        assert value(m, "orchestrator_workers_seen", family=family) >= 1
    # Six submissions over two gunicorn workers, counted once each, by route template.
    assert value(m, "orchestrator_http_request_duration_seconds_count",
                 route="/functions/v1/queue-job", method="POST", status="200") == 6
    assert value(m, "orchestrator_http_request_duration_seconds_count",
                 route="/v1/jobs/<job_id>", method="GET") >= 6
    routes = {dict(lab).get("route", "") for (_, lab) in m}
    assert "/v1/jobs/<job_id>/cancel" in routes and not any(UUID.search(r) for r in routes)
    # Every process wrote to the one directory: web workers and Celery worker processes.
    files = list(Path(stack.env["PROMETHEUS_MULTIPROC_DIR"]).glob("*.db"))
    pids = {f.stem.rsplit("_", 1)[1] for f in files}
    assert len(pids) >= 3, sorted(f.name for f in files)
