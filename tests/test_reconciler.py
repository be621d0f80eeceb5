"""The reconciler against the real databases: leases, deadlines, publishing."""
from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections import Counter
from typing import Any

from sqlalchemy import func, select

from orchestrator import completion, reconciler
from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.models import CreditEntry, Image, Job, utcnow
from tests.helpers import submit


class Recorder:
    """A publisher that records what it was asked to publish (thread-safe)."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, job_id: str, job_type: str) -> None:
        with self._lock:
            self.sent.append(job_id)


def _later(seconds: float) -> dt.datetime:
    return utcnow() + dt.timedelta(seconds=seconds)


def test_expired_lease_requeues_then_fails_when_attempts_are_used(db: Database, settings: Settings) -> None:
    user = str(uuid.uuid4())
    job = submit(db, user, "image_fast")
    for attempt in (1, 2, 3):
        claimed = completion.start_job(db, job.id, worker=f"w{attempt}", lease_seconds=5)
        assert claimed is not None and claimed.attempts == attempt
        pub = Recorder()
        report = reconciler.reconcile(db, settings, pub, now=_later(6))
        if attempt < 3:
            assert report.requeued == [job.id] and pub.sent == [job.id]
            with db.session() as s:
                row = s.get(Job, job.id)
                assert row.status == "queued" and row.lease_owner is None
                assert s.get(Image, row.image_id).status == "queued"
        else:
            assert report.exhausted == [job.id] and pub.sent == []
    with db.session() as s:
        row = s.get(Job, job.id)
        refunds = s.execute(select(func.count()).select_from(CreditEntry).where(
            CreditEntry.job_id == job.id, CreditEntry.reason == "job_refund")).scalar_one()
        assert row.status == "failed" and "attempts" in row.error_message
        assert s.get(Image, row.image_id).status == "failed" and refunds == 1


def test_live_lease_is_left_alone(db: Database, settings: Settings) -> None:
    job = submit(db, str(uuid.uuid4()), "image_fast")
    completion.start_job(db, job.id, worker="w", lease_seconds=60)
    report = reconciler.reconcile(db, settings, Recorder(), now=_later(30))
    assert report.requeued == [] and report.exhausted == []
    with db.session() as s:
        assert s.get(Job, job.id).status == "processing"


def test_stale_worker_cannot_finish_after_requeue(db: Database, settings: Settings) -> None:
    job = submit(db, str(uuid.uuid4()), "image_fast")
    completion.start_job(db, job.id, worker="old", lease_seconds=1)
    reconciler.reconcile(db, settings, Recorder(), now=_later(2))
    fresh = completion.start_job(db, job.id, worker="new", lease_seconds=60)
    assert fresh is not None and fresh.attempts == 2
    late = completion.finish_job(db, job.id, completion.Outcome(
        completion.JobStatus.COMPLETED, attempt=1, assets=[f"{job.user_id}/old.png"]))
    assert not late.changed and late.job.status == "processing"
    assert not completion.renew_lease(db, job.id, 1, 60)


def test_deadline_fails_forgotten_jobs(db: Database, settings: Settings) -> None:
    job = submit(db, str(uuid.uuid4()), "video_high")
    deadline = reconciler.deadline_seconds(reconciler.JOB_TYPES["video_high"], settings)
    assert reconciler.reconcile(db, settings, Recorder(), now=_later(deadline - 60)).expired == []
    report = reconciler.reconcile(db, settings, Recorder(), now=_later(deadline + 1))
    assert report.expired == [job.id]
    with db.session() as s:
        assert s.get(Job, job.id).error_message == "deadline exceeded"


def test_lost_messages_are_offered_again_once_per_period(db: Database, settings: Settings) -> None:
    job = submit(db, str(uuid.uuid4()), "image_fast")
    completion.mark_dispatched(db, job.id)
    pub = Recorder()
    assert reconciler.reconcile(db, settings, pub, now=_later(10)).reoffered == []
    when = _later(settings.reoffer_after + 1)
    assert reconciler.reconcile(db, settings, pub, now=when).reoffered == [job.id]
    assert reconciler.reconcile(db, settings, pub, now=when).reoffered == []
    assert pub.sent == [job.id]


def test_failed_publish_is_tried_again(db: Database, settings: Settings) -> None:
    job = submit(db, str(uuid.uuid4()), "image_fast")

    def broken(job_id: str, job_type: str) -> None:
        raise ConnectionError("broker down")

    when = _later(settings.publish_grace + 1)
    assert reconciler.reconcile(db, settings, broken, now=when).publish_failed == [job.id]
    pub = Recorder()
    assert reconciler.reconcile(db, settings, pub, now=when).published == [job.id]


def test_two_reconcilers_at_once_publish_each_job_once(db: Database, settings: Settings) -> None:
    jobs = [submit(db, str(uuid.uuid4()), "image_fast").id for _ in range(30)]
    pub = Recorder()
    when = _later(settings.publish_grace + 1)
    errors: list[BaseException] = []

    def run() -> None:
        other = Database(settings.database_url)
        try:
            reconciler.reconcile(other, settings, pub, now=when)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            other.dispose()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert Counter(pub.sent) == Counter({j: 1 for j in jobs})
