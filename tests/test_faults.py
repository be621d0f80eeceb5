"""Delivery guarantees under injected faults, with real processes: a private
PostgreSQL server and a private Redis (AOF on) that the tests stop, restart
and flush, and the Procfile's web, workers, maintenance worker and beat.

Every job the API accepted must end in a terminal state exactly once, with
one set of files and a consistent asset row.
"""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
from celery import Celery

from orchestrator.config import DEV_WORKER_TOKEN
from tests.stack import Stack, make_stack

pytestmark = pytest.mark.e2e

PROCESSES = ("web", "worker_sdxl", "worker_wan", "worker_maintenance", "beat")
FAST = dict(LEASE_SECONDS="3", RECONCILE_INTERVAL="1", PUBLISH_GRACE="1", REOFFER_AFTER="4",
            ORCHESTRATOR_FAULTS="1", GENERATION_TIME_SCALE="0.02", MAX_ATTEMPTS="3")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    st = make_stack("postgres-redis", tmp_path_factory.mktemp("faults"), PROCESSES,
                    private_redis=True, private_postgres=True, **FAST)
    with st.running():
        yield st


def _events(stack: Stack, job_id: str) -> list[str]:
    shown = json.loads(stack.cli("jobs", "show", job_id, "--events"))
    return [e["type"] for e in shown["events"]]


def _files(stack: Stack, bucket: str, user_id: str) -> list[str]:
    folder = Path(stack.env["VAR_DIR"]) / "storage" / bucket / user_id
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _assert_completed_once(stack: Stack, job: dict[str, Any]) -> None:
    assert job["status"] == "completed", job
    kinds = _events(stack, job["id"])
    assert kinds.count("job.completed") == 1 and "job.failed" not in kinds


def test_worker_killed_mid_job_completes_once_on_attempt_two(stack: Stack) -> None:
    user_id, headers = stack.user()
    job_id = stack.submit(headers, "video_fast").json()["job"]["id"]
    stack.wait_for(headers, [job_id], timeout=30,
                   until=lambda j: j["status"] == "processing" and j["progress"] > 0)
    stack.kill("worker_wan", signal.SIGKILL)
    stack.start("worker_wan")
    job = stack.wait_for(headers, [job_id], timeout=60)[job_id]
    _assert_completed_once(stack, job)
    assert job["attempts"] == 2
    assert _files(stack, "video_fast", user_id) == [f"{job_id}.mp4", f"{job_id}_thumb.png"]
    video = requests.get(f"{stack.base_url}/v1/videos/{job['video_id']}", headers=headers,
                         timeout=10).json()
    assert video["status"] == "completed" and video["video_url"] == f"{user_id}/{job_id}.mp4"
    me = requests.get(f"{stack.base_url}/v1/me", headers=headers, timeout=10).json()
    assert me["token_balance"] == 97


def test_poison_job_fails_after_max_attempts_and_the_queue_drains(stack: Stack) -> None:
    _, headers = stack.user()
    poison = stack.submit(headers, "image_fast", fault="crash_worker").json()["job"]["id"]
    normal = [stack.submit(headers, "image_high").json()["job"]["id"] for _ in range(2)]
    jobs = stack.wait_for(headers, [poison, *normal], timeout=90)
    assert jobs[poison]["status"] == "failed" and jobs[poison]["attempts"] == 3
    assert "attempts" in jobs[poison]["error_message"]
    for job_id in normal:
        _assert_completed_once(stack, jobs[job_id])
    me = requests.get(f"{stack.base_url}/v1/me", headers=headers, timeout=10).json()
    assert me["token_balance"] == 100 - 2 * 2  # the poison job was refunded


def test_transient_errors_retry_with_backoff_then_complete(stack: Stack) -> None:
    _, headers = stack.user()
    job_id = stack.submit(headers, "sdxl_image_fast", fault="transient:2").json()["job"]["id"]
    job = stack.wait_for(headers, [job_id], timeout=60)[job_id]
    _assert_completed_once(stack, job)
    assert job["attempts"] == 3
    assert _events(stack, job_id).count("job.retrying") == 2


def test_duplicate_deliveries_run_once_and_late_callbacks_change_nothing(stack: Stack) -> None:
    user_id, headers = stack.user()
    job_id = stack.submit(headers, "image_fast").json()["job"]["id"]
    sender = Celery("dup", broker=stack.env["BROKER_URL"])
    for _ in range(2):  # the same message twice more
        sender.send_task("generation.run", args=(job_id,), task_id=job_id, queue="wan")
    job = stack.wait_for(headers, [job_id], timeout=30)[job_id]
    time.sleep(2)  # let the duplicates arrive and be skipped
    after = stack.job(headers, job_id)
    _assert_completed_once(stack, after)
    assert after["attempts"] == 1 and after["completed_at"] == job["completed_at"]
    assert _events(stack, job_id).count("job.processing") == 1
    late = requests.post(f"{stack.base_url}/functions/v1/job-callback", timeout=10,
                         headers={"Authorization": f"Bearer {stack.env.get('WORKER_TOKEN', DEV_WORKER_TOKEN)}"},
                         json={"job_id": job_id, "status": "failed", "error_message": "late"})
    assert late.status_code == 200 and late.json()["status"] == "completed"
    assert stack.job(headers, job_id)["updated_at"] == after["updated_at"]
    sender.close()


def test_api_killed_between_commit_and_publish(stack: Stack) -> None:
    _, headers = stack.user()
    with pytest.raises(requests.RequestException):
        stack.submit(headers, "image_fast", fault="crash_before_publish")
    listed = requests.get(f"{stack.base_url}/v1/jobs", headers=headers, timeout=10).json()["jobs"]
    assert len(listed) == 1
    job = stack.wait_for(headers, [listed[0]["id"]], timeout=30)[listed[0]["id"]]
    _assert_completed_once(stack, job)
    assert job["attempts"] == 1 and job["dispatched_at"] is not None


def test_redis_down_during_submission(stack: Stack) -> None:
    assert stack.redis is not None
    _, headers = stack.user()
    stack.redis.stop()
    accepted = []
    try:
        for _ in range(4):
            started = time.monotonic()
            r = stack.submit(headers, "sdxl_image_fast")
            assert time.monotonic() - started < 3
            assert r.status_code in (200, 503), r.text
            if r.status_code == 200:
                accepted.append(r.json()["job"]["id"])
        ready = requests.get(f"{stack.base_url}/readyz", timeout=10)
        assert ready.status_code == 503 and ready.json()["checks"]["broker"] != "ok"
    finally:
        stack.redis.start()
    assert accepted, "a committed job should be accepted while the broker is down"
    jobs = stack.wait_for(headers, accepted, timeout=90)
    for job in jobs.values():
        _assert_completed_once(stack, job)
        assert job["attempts"] == 1


def test_redis_restart_keeps_queued_messages(stack: Stack) -> None:
    assert stack.redis is not None
    _, headers = stack.user()
    stack.kill("worker_wan", signal.SIGTERM)
    ids = [stack.submit(headers, "image_fast").json()["job"]["id"] for _ in range(3)]
    assert stack.redis.client().llen("wan") == 3
    stack.redis.stop()
    stack.redis.start()
    assert stack.redis.client().llen("wan") == 3  # AOF kept them
    stack.start("worker_wan")
    for job in stack.wait_for(headers, ids, timeout=60).values():
        _assert_completed_once(stack, job)
        assert job["attempts"] == 1


def test_redis_emptied_jobs_are_offered_again(stack: Stack) -> None:
    assert stack.redis is not None
    _, headers = stack.user()
    stack.kill("worker_wan", signal.SIGTERM)
    ids = [stack.submit(headers, "image_fast").json()["job"]["id"] for _ in range(3)]
    stack.redis.client().flushall()
    stack.start("worker_wan")
    for job in stack.wait_for(headers, ids, timeout=60).values():
        _assert_completed_once(stack, job)
        assert job["attempts"] == 1


def test_postgres_stopped_while_a_job_finishes(stack: Stack) -> None:
    assert stack.postgres is not None
    _, headers = stack.user()
    job_id = stack.submit(headers, "video_fast").json()["job"]["id"]
    stack.wait_for(headers, [job_id], timeout=30, until=lambda j: j["status"] == "processing")
    stack.postgres.stop()
    try:
        started = time.monotonic()
        r = stack.submit(headers, "image_fast")
        assert time.monotonic() - started < 3
        assert r.status_code == 503 and r.json()["success"] is False
        assert "Traceback" not in r.text and "psycopg" not in r.text
        read = requests.get(f"{stack.base_url}/v1/jobs/{job_id}", headers=headers, timeout=10)
        assert read.status_code == 503
        ready = requests.get(f"{stack.base_url}/readyz", timeout=10)
        assert ready.status_code == 503 and ready.json()["checks"]["database"] != "ok"
        time.sleep(6)  # the generation ends while the database is away
    finally:
        stack.postgres.start()
    job = stack.wait_for(headers, [job_id], timeout=60)[job_id]
    _assert_completed_once(stack, job)
