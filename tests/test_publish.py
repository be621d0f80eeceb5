"""Commit, then publish: a committed job is accepted even when the broker is
down, and the reconciler publishes it later."""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
import uuid
from pathlib import Path
from typing import Any

from celery import Celery

from orchestrator import reconciler
from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.jobtypes import JOB_TYPES
from orchestrator.models import Job, utcnow
from tasks.publish import publish_job
from tasks.routing import GENERATION_TASK
from tests.helpers import wait_until


def _dead_publisher() -> Any:
    dead = Celery("dead", broker="redis://127.0.0.1:1/0")  # nothing listens on port 1
    dead.conf.update(broker_connection_timeout=0.5, redis_socket_connect_timeout=0.5)

    def publish(job_id: str, job_type: str) -> None:
        dead.send_task(GENERATION_TASK, args=(job_id,), task_id=job_id, queue="wan",
                       retry=True, retry_policy={"max_retries": 1, "interval_start": 0})

    return publish


def test_dead_broker_still_accepts_and_reconciler_publishes(
        settings: Settings, db: Database, make_user: Any, redis_client: Any) -> None:
    from web import create_app

    client = create_app(settings, publisher=_dead_publisher()).test_client()
    user_id, headers = make_user()
    started = time.monotonic()
    r = client.post("/functions/v1/queue-job", headers=headers,
                    json={"jobType": "video_fast", "metadata": {"prompt": "waves"}})
    assert time.monotonic() - started < 3
    assert r.status_code == 200 and r.json["success"] is True
    job_id = r.json["job"]["id"]
    with db.session() as s:
        job = s.get(Job, job_id)
    assert job.status == "queued" and job.dispatched_at is None
    assert client.get("/v1/me", headers=headers).json["token_balance"] == 97

    # Within the grace period the reconciler leaves it alone (the API may still publish).
    redis_client.flushdb()
    early = reconciler.reconcile(db, settings, publish_job)
    assert early.published == []
    # Past it, the reconciler publishes it, once.
    past_grace = utcnow() + dt.timedelta(seconds=settings.publish_grace + 1)
    later = reconciler.reconcile(db, settings, publish_job, now=past_grace)
    assert later.published == [job_id]
    assert redis_client.llen("wan") == 1
    again = reconciler.reconcile(db, settings, publish_job)
    assert again.published == [] and redis_client.llen("wan") == 1
    with db.session() as s:
        assert s.get(Job, job_id).dispatched_at is not None


def test_published_job_is_marked_dispatched(client: Any, db: Database, make_user: Any,
                                            redis_client: Any) -> None:
    redis_client.flushdb()
    user_id, headers = make_user()
    r = client.post("/functions/v1/queue-job", headers=headers,
                    json={"jobType": "sdxl_image_fast", "metadata": {"prompt": "a fox"}})
    assert r.status_code == 200

    def marked() -> bool:  # in the web process's next batch of marks (50 ms)
        with db.session() as s:
            return s.get(Job, r.json["job"]["id"]).dispatched_at is not None

    assert wait_until(marked)
    assert redis_client.llen("sdxl") == 1 and redis_client.llen("wan") == 0


def test_dispatch_marks_are_batched_and_flushed_at_exit(db: Database, make_user: Any) -> None:
    from orchestrator.dispatch_marks import DispatchMarks
    from tests.helpers import submit

    user_id, _ = make_user()
    jobs = [submit(db, user_id) for _ in range(3)]
    marks = DispatchMarks(db, interval=60)  # the thread would wait a minute: close() must flush
    for job in jobs:
        marks.add(job.id)
    with db.session() as s:
        assert all(s.get(Job, j.id).dispatched_at is None for j in jobs)
    marks.close()
    with db.session() as s:
        rows = [s.get(Job, j.id) for j in jobs]
    assert all(r.dispatched_at is not None for r in rows)
    # Bookkeeping only: the job's updated_at (what clients see change) stays.
    assert [r.updated_at for r in rows] == [j.updated_at for j in jobs]
    assert marks.flush() == 0  # nothing pending, nothing marked twice


def test_dispatch_marks_thread_ends_when_idle(db: Database, make_user: Any) -> None:
    """An idle instance holds no thread (a thread would keep its database's pool alive)."""
    from orchestrator.dispatch_marks import IDLE_EXIT_S, DispatchMarks
    from tests.helpers import submit

    user_id, _ = make_user()
    job = submit(db, user_id)
    marks = DispatchMarks(db, interval=0.01)
    marks.add(job.id)
    thread = marks._thread
    assert thread is not None and thread.is_alive()
    thread.join(timeout=IDLE_EXIT_S + 5)
    assert not thread.is_alive()
    with db.session() as s:
        assert s.get(Job, job.id).dispatched_at is not None
    again = submit(db, user_id)
    marks.add(again.id)  # a new thread for the next id
    assert wait_until(lambda: marks._thread is None, timeout=IDLE_EXIT_S + 5)
    with db.session() as s:
        assert s.get(Job, again.id).dispatched_at is not None


def _messages(redis_client: Any, queue: str) -> list[dict[str, Any]]:
    """The queue's messages, oldest first, without kombu's per-message delivery tag."""
    found = []
    for raw in reversed(redis_client.lrange(queue, 0, -1)):
        message = json.loads(raw)
        message["properties"].pop("delivery_tag")
        found.append(message)
    return found


def test_publish_job_sends_what_apply_async_sends(redis_client: Any) -> None:
    """publish_job builds the message with the calls send_task makes, minus what a web
    process never needs: byte for byte the message apply_async would send (body,
    headers, properties, route), for each family and its time limits."""
    from tasks.generation import run_generation
    from tasks.publish import RETRY_POLICY
    from tasks.routing import route_for

    for job_type in ("sdxl_image_high", "video_high"):
        spec = JOB_TYPES[job_type]
        queue = spec.family.value
        redis_client.delete(queue)
        job_id = str(uuid.uuid4())
        run_generation.apply_async(args=(job_id,), task_id=job_id, retry=True,
                                   retry_policy=RETRY_POLICY, **route_for(spec))
        publish_job(job_id, job_type)
        by_celery, ours = _messages(redis_client, queue)
        assert ours == by_celery
        assert ours["headers"]["timelimit"] == [spec.hard_time_limit, spec.soft_time_limit]
        redis_client.delete(queue)


def test_publish_job_fills_the_routes_template_per_job_and_thread(redis_client: Any,
                                                                 monkeypatch: Any) -> None:
    """After a route's first job, publish_job sends without Celery: the template Celery made,
    with each job's own id (also inside the base64 body), its thread's reply-to and a fresh
    delivery tag, exactly what apply_async would send from that thread."""
    import base64
    import threading

    from tasks import publish as publishing
    from tasks.generation import run_generation
    from tasks.publish import RETRY_POLICY
    from tasks.routing import route_for

    spec = JOB_TYPES["image_fast"]
    publish_job(str(uuid.uuid4()), "image_fast")  # the route's template exists
    redis_client.delete("wan")

    def no_celery(*_: Any) -> None:
        raise AssertionError("published through Celery")

    monkeypatch.setattr(publishing, "_publish_with_celery", no_celery)
    ids = [str(uuid.uuid4()) for _ in range(3)]
    publish_job(ids[0], "image_fast")
    publish_job(ids[1], "image_fast")
    thread = threading.Thread(target=publish_job, args=(ids[2], "image_fast"))
    thread.start()
    thread.join()
    ours = _messages(redis_client, "wan")
    assert [m["headers"]["id"] for m in ours] == ids
    for job_id, message in zip(ids, ours):
        assert json.loads(base64.b64decode(message["body"]))[0] == [job_id]
        assert message["headers"]["argsrepr"] == repr((job_id,))
        assert message["properties"]["correlation_id"] == job_id
    assert ours[0]["properties"]["reply_to"] == run_generation.app.thread_oid
    assert ours[2]["properties"]["reply_to"] != ours[0]["properties"]["reply_to"]
    tags = {json.loads(raw)["properties"]["delivery_tag"] for raw in redis_client.lrange("wan", 0, -1)}
    assert len(tags) == 3

    # The other thread's message is apply_async's from that thread.
    monkeypatch.undo()
    redis_client.delete("wan")
    sent: list[Any] = []

    def both(job_id: str) -> None:
        run_generation.apply_async(args=(job_id,), task_id=job_id, retry=True,
                                   retry_policy=RETRY_POLICY, **route_for(spec))
        publish_job(job_id, "image_fast")
        sent.append(job_id)

    thread = threading.Thread(target=both, args=(str(uuid.uuid4()),))
    thread.start()
    thread.join()
    by_celery, ours_too = _messages(redis_client, "wan")
    assert sent and ours_too == by_celery
    redis_client.delete("wan")


def test_a_failed_lpush_is_published_through_celery(redis_client: Any, monkeypatch: Any) -> None:
    """The template's LPUSH failing (say a connection reset) costs nothing: Celery's path,
    with its reconnects and retries, sends the message; the next job gets a new template.
    One that timed out is not sent again through Celery."""
    import redis as redis_lib

    from tasks import publish as publishing

    publish_job(str(uuid.uuid4()), "sdxl_image_fast")
    redis_client.delete("sdxl")
    (key, template), = [(k, t) for k, t in publishing._templates.items() if k[1] == "sdxl"
                        and t is not None and k[2] == JOB_TYPES["sdxl_image_fast"].hard_time_limit]

    def reset(*_: Any) -> None:
        raise redis_lib.ConnectionError("Connection reset by peer")

    monkeypatch.setattr(template.client, "lpush", reset)
    job_id = str(uuid.uuid4())
    publish_job(job_id, "sdxl_image_fast")
    assert [m["headers"]["id"] for m in _messages(redis_client, "sdxl")] == [job_id]
    assert key not in publishing._templates
    monkeypatch.undo()  # the connection works again
    publish_job(str(uuid.uuid4()), "sdxl_image_fast")
    assert publishing._templates[key] is not template
    assert redis_client.llen("sdxl") == 2
    redis_client.delete("sdxl")

    # A broker that stopped answering: no second wait through Celery; the caller
    # (publish_committed) leaves the job to the reconciler.
    template = publishing._templates[key]

    def hang(*_: Any) -> None:
        raise redis_lib.TimeoutError("Timeout reading from socket")

    def no_celery(*_: Any) -> None:
        raise AssertionError("published through Celery after a timeout")

    monkeypatch.setattr(template.client, "lpush", hang)
    monkeypatch.setattr(publishing, "_publish_with_celery", no_celery)
    try:
        publish_job(str(uuid.uuid4()), "sdxl_image_fast")
    except redis_lib.TimeoutError:
        pass
    else:
        raise AssertionError("no TimeoutError")
    assert key not in publishing._templates and redis_client.llen("sdxl") == 0


def test_publish_signal_receivers_see_every_job(redis_client: Any) -> None:
    """With receivers of Celery's publish signals connected (an APM, say), every job goes
    through Celery, so they see each message."""
    from celery import signals

    publish_job(str(uuid.uuid4()), "video_fast")  # a template exists
    seen: list[str] = []

    def receiver(headers: dict[str, Any] | None = None, **_: Any) -> None:
        seen.append(headers["id"])

    signals.before_task_publish.connect(receiver, weak=False)
    try:
        job_id = str(uuid.uuid4())
        publish_job(job_id, "video_fast")
    finally:
        signals.before_task_publish.disconnect(receiver)
    assert seen == [job_id]
    assert _messages(redis_client, "wan")[-1]["headers"]["id"] == job_id
    redis_client.delete("wan")


def test_redis_broker_reuses_one_client_per_channel(redis_client: Any, monkeypatch: Any) -> None:
    """kombu's own Redis channel builds a redis.Redis per published message; the service's
    transport (tasks.redis_transport, chosen for redis:// brokers) keeps one."""
    import redis as redis_lib

    from tasks.celery_app import celery_app
    from tasks.redis_transport import Transport

    with celery_app.connection_for_write() as conn:
        assert isinstance(conn.transport, Transport)
    made: list[int] = []
    real_init = redis_lib.Redis.__init__

    def counting_init(self: Any, *args: Any, **kwargs: Any) -> None:
        made.append(1)
        real_init(self, *args, **kwargs)

    publish_job(str(uuid.uuid4()), "image_fast")  # the producer pool's channel exists
    monkeypatch.setattr(redis_lib.Redis, "__init__", counting_init)
    for _ in range(5):
        publish_job(str(uuid.uuid4()), "image_fast")
    assert made == []
    redis_client.delete("wan")


def test_other_brokers_keep_kombus_transport(tmp_path: Path) -> None:
    from tasks.config import celery_config

    settings = Settings.from_env({"DATABASE_URL": f"sqlite:///{tmp_path}/x.db",
                                  "BROKER_URL": f"sqla+sqlite:///{tmp_path}/b.db",
                                  "VAR_DIR": str(tmp_path)})
    assert "broker_transport" not in celery_config(settings)
    amqp = dataclasses.replace(settings, broker_url="amqp://guest:guest@127.0.0.1:5672//")
    assert "broker_transport" not in celery_config(amqp)
