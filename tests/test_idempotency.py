"""Idempotency-Key on job submission, cancel and retry."""
from __future__ import annotations

import threading
import uuid
from typing import Any

from sqlalchemy import func, select

from orchestrator.db import Database
from orchestrator.models import IdempotencyKey, Job

BODY = {"jobType": "image_fast", "metadata": {"prompt": "a quiet harbour"}}


def _count_jobs(db: Database, user_id: str) -> int:
    with db.session() as s:
        return s.execute(select(func.count()).select_from(Job).where(Job.user_id == user_id)).scalar_one()


def test_same_key_same_body_same_answer_one_job(client: Any, db: Database, make_user: Any) -> None:
    user_id, headers = make_user()
    keyed = {**headers, "Idempotency-Key": "order-42"}
    first = client.post("/functions/v1/queue-job", headers=keyed, json=BODY)
    second = client.post("/functions/v1/queue-job", headers=keyed, json=BODY)
    assert first.status_code == second.status_code == 200
    assert first.get_data() == second.get_data()
    assert second.headers.get("Idempotent-Replayed") == "true"
    assert _count_jobs(db, user_id) == 1
    assert client.get("/v1/me", headers=headers).json["token_balance"] == 99


def test_same_key_other_body_is_422(client: Any, db: Database, make_user: Any) -> None:
    user_id, headers = make_user()
    keyed = {**headers, "Idempotency-Key": "k1"}
    assert client.post("/functions/v1/queue-job", headers=keyed, json=BODY).status_code == 200
    other = client.post("/functions/v1/queue-job", headers=keyed,
                        json={**BODY, "jobType": "image_high"})
    assert other.status_code == 422 and other.json["code"] == "unprocessable"
    assert _count_jobs(db, user_id) == 1


def test_keys_are_scoped_per_user(client: Any, db: Database, make_user: Any) -> None:
    alice, a_headers = make_user()
    bob, b_headers = make_user()
    for headers in (a_headers, b_headers):
        r = client.post("/functions/v1/queue-job", headers={**headers, "Idempotency-Key": "same"},
                        json=BODY)
        assert r.status_code == 200
    assert _count_jobs(db, alice) == 1 and _count_jobs(db, bob) == 1


def test_rest_submission_and_bad_keys(client: Any, db: Database, make_user: Any) -> None:
    user_id, headers = make_user()
    keyed = {**headers, "Idempotency-Key": "rest-1"}
    a = client.post("/v1/jobs", headers=keyed, json=BODY)
    b = client.post("/v1/jobs", headers=keyed, json=BODY)
    assert a.status_code == b.status_code == 201 and a.json == b.json
    assert _count_jobs(db, user_id) == 1
    too_long = client.post("/v1/jobs", headers={**headers, "Idempotency-Key": "x" * 300}, json=BODY)
    assert too_long.status_code == 400 and _count_jobs(db, user_id) == 1


def test_concurrent_duplicates_never_make_two_jobs(app: Any, db: Database, make_user: Any) -> None:
    user_id, headers = make_user()
    keyed = {**headers, "Idempotency-Key": "race"}
    results: list[Any] = []
    barrier = threading.Barrier(6)

    def send() -> None:
        client = app.test_client()
        barrier.wait()
        r = client.post("/functions/v1/queue-job", headers=keyed, json=BODY)
        results.append((r.status_code, r.get_data()))

    threads = [threading.Thread(target=send) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _count_jobs(db, user_id) == 1
    ok = [body for status, body in results if status == 200]
    assert ok and len(set(ok)) == 1
    assert all(status in (200, 409) for status, _ in results)
    with db.session() as s:
        assert s.execute(select(func.count()).select_from(IdempotencyKey)).scalar_one() == 1


def test_retry_of_failed_job_charges_again_and_refunds_again(
        client: Any, db: Database, make_user: Any, worker_headers: dict[str, str]) -> None:
    user_id, headers = make_user()
    job_id = client.post("/functions/v1/queue-job", headers=headers, json=BODY).json["job"]["id"]
    fail = {"job_id": job_id, "status": "failed", "error_message": "GPU fell over"}
    assert client.post("/functions/v1/job-callback", headers=worker_headers, json=fail).status_code == 200
    assert client.get("/v1/me", headers=headers).json["token_balance"] == 100

    keyed = {**headers, "Idempotency-Key": "retry-1"}
    retried = client.post(f"/v1/jobs/{job_id}/retry", headers=keyed)
    assert retried.status_code == 200, retried.json
    assert retried.json["job"]["status"] == "queued" and retried.json["token_balance"] == 99
    replay = client.post(f"/v1/jobs/{job_id}/retry", headers=keyed)
    assert replay.status_code == 200 and replay.json == retried.json
    assert client.post(f"/v1/jobs/{job_id}/retry", headers=headers).status_code == 409
    assert client.get("/v1/me", headers=headers).json["token_balance"] == 99

    assert client.post("/functions/v1/job-callback", headers=worker_headers, json=fail).status_code == 200
    assert client.get("/v1/me", headers=headers).json["token_balance"] == 100
    with db.session() as s:
        job = s.get(Job, job_id)
    assert job.status == "failed" and job.charges == 2


def test_retry_rules(client: Any, make_user: Any, worker_headers: dict[str, str]) -> None:
    _, headers = make_user()
    _, other = make_user()
    job_id = client.post("/functions/v1/queue-job", headers=headers, json=BODY).json["job"]["id"]
    assert client.post(f"/v1/jobs/{job_id}/retry", headers=headers).status_code == 409
    assert client.post(f"/v1/jobs/{job_id}/retry", headers=other).status_code == 404
    assert client.post(f"/v1/jobs/{uuid.uuid4()}/retry", headers=headers).status_code == 404
    assert client.post("/v1/jobs/nope/retry", headers=headers).status_code == 404
