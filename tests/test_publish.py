"""Commit, then publish: what the client is told when the broker refuses."""
from __future__ import annotations

from typing import Any

from celery import Celery
from sqlalchemy import select

from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.models import CreditEntry, Job
from tasks.routing import GENERATION_TASK


def test_dead_broker_answers_503_fails_and_refunds(settings: Settings, db: Database,
                                                   make_user: Any) -> None:
    from web import create_app

    dead = Celery("dead", broker="redis://127.0.0.1:1/0")  # nothing listens on port 1
    dead.conf.update(broker_connection_timeout=0.5, redis_socket_connect_timeout=0.5)

    def publish(job_id: str, job_type: str) -> None:
        dead.send_task(GENERATION_TASK, args=(job_id,), task_id=job_id, queue="wan",
                       retry=True, retry_policy={"max_retries": 1, "interval_start": 0})

    client = create_app(settings, publisher=publish).test_client()
    user_id, headers = make_user()
    r = client.post("/functions/v1/queue-job", headers=headers,
                    json={"jobType": "video_fast", "metadata": {"prompt": "waves"}})
    assert r.status_code == 503
    assert r.json["success"] is False and r.json["code"] == "unavailable"
    assert "Traceback" not in r.get_data(as_text=True)
    assert client.get("/v1/me", headers=headers).json["token_balance"] == 100
    with db.session() as s:
        job = s.execute(select(Job).where(Job.user_id == user_id)).scalar_one()
        reasons = sorted(s.execute(select(CreditEntry.reason).where(
            CreditEntry.job_id == job.id)).scalars())
    assert job.status == "failed" and job.dispatched_at is None
    assert reasons == ["job_charge", "job_refund"]


def test_published_job_is_marked_dispatched(client: Any, db: Database, make_user: Any,
                                            redis_client: Any) -> None:
    redis_client.flushdb()
    user_id, headers = make_user()
    r = client.post("/functions/v1/queue-job", headers=headers,
                    json={"jobType": "sdxl_image_fast", "metadata": {"prompt": "a fox"}})
    assert r.status_code == 200
    with db.session() as s:
        assert s.get(Job, r.json["job"]["id"]).dispatched_at is not None
    assert redis_client.llen("sdxl") == 1 and redis_client.llen("wan") == 0
