"""The reconciler: the database is the truth, and this makes the broker agree.

One pass (a beat task every ``RECONCILE_INTERVAL`` seconds, or ``orchestrator
reconcile``):

1. leases that expired (the worker died): back to ``queued`` while attempts
   remain, else ``failed`` with the reason;
2. jobs past their type's deadline (counted from when the current run was
   queued): ``failed``;
3. jobs committed but never published (the API died, the broker was down):
   published;
4. queued jobs whose message may have been lost (a flushed or restarted
   broker): offered again after ``REOFFER_AFTER`` seconds.

Every step is a guarded compare-and-set, so two reconcilers running at once do
no harm. Publishing marks ``dispatched_at`` first, in a transaction that takes
the rows ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so two reconcilers never
publish the same job in the same pass. A job offered twice is harmless: the
second delivery finds it not queued and does nothing.
"""
from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Callable

from sqlalchemy import and_, func, or_, select, update

from orchestrator import completion, idempotency
from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.jobtypes import JOB_TYPES, JobType
from orchestrator.models import Job, utcnow
from orchestrator.status import JobStatus

log = logging.getLogger(__name__)

Publisher = Callable[[str, str], None]
BATCH = 200


@dataclass
class ReconcileReport:
    requeued: list[str] = field(default_factory=list)
    exhausted: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    published: list[str] = field(default_factory=list)
    reoffered: list[str] = field(default_factory=list)
    publish_failed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {k: len(v) for k, v in vars(self).items()}


def deadline_seconds(spec: JobType, settings: Settings) -> float:
    """How long a job of this type may take from submission to its end:
    every attempt at its hard limit, plus the longest wait in the queue."""
    return spec.hard_time_limit * settings.max_attempts + settings.max_queue_wait


def _locked(db: Database, stmt):  # type: ignore[no-untyped-def]
    """Candidate rows, each taken by one reconciler only (PostgreSQL)."""
    with db.transaction() as session:
        if db.dialect == "postgresql":
            stmt = stmt.with_for_update(skip_locked=True)
        return list(session.execute(stmt.limit(BATCH)).all())


def _expire_leases(db: Database, now: dt.datetime, report: ReconcileReport) -> None:
    rows = _locked(db, select(Job.id, Job.attempts, Job.max_attempts).where(
        Job.status == JobStatus.PROCESSING.value, Job.lease_expires_at < now))
    for job_id, attempts, max_attempts in rows:
        if attempts < max_attempts:
            if completion.requeue_expired(db, job_id, attempts, now=now):
                report.requeued.append(job_id)
        else:
            with db.session() as session:
                job = session.get(Job, job_id)
            if job is not None and completion.fail_exhausted(db, job, now=now).changed:
                report.exhausted.append(job_id)


def _expire_deadlines(db: Database, settings: Settings, now: dt.datetime,
                      report: ReconcileReport) -> None:
    since = func.coalesce(Job.queued_at, Job.created_at)
    late = or_(*(and_(Job.job_type == name,
                      since < now - dt.timedelta(seconds=deadline_seconds(spec, settings)))
                 for name, spec in JOB_TYPES.items()))
    rows = _locked(db, select(Job.id).where(
        Job.status.in_((JobStatus.QUEUED.value, JobStatus.PROCESSING.value)), late))
    for (job_id,) in rows:
        done = completion.finish_job(db, job_id, completion.Outcome(
            JobStatus.FAILED, error="deadline exceeded"))
        if done.changed:
            report.expired.append(job_id)


def _take_for_publish(db: Database, condition, now: dt.datetime) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    """Mark candidates dispatched (so a concurrent reconciler skips them), then publish."""
    with db.transaction() as session:
        stmt = select(Job.id, Job.job_type, Job.dispatched_at).where(
            Job.status == JobStatus.QUEUED.value, condition).order_by(Job.created_at).limit(BATCH)
        if db.dialect == "postgresql":
            stmt = stmt.with_for_update(skip_locked=True)
        rows = list(session.execute(stmt).all())
        taken = []
        for job_id, job_type, seen in rows:
            guard = Job.dispatched_at.is_(None) if seen is None else Job.dispatched_at == seen
            hit = session.execute(update(Job).where(Job.id == job_id, guard)
                                  .values(dispatched_at=now)
                                  .execution_options(synchronize_session=False))
            if hit.rowcount:
                taken.append((job_id, job_type))
        return taken


def _publish(db: Database, publish: Publisher, jobs: list[tuple[str, str]], ok: list[str],
             failed: list[str]) -> None:
    for job_id, job_type in jobs:
        try:
            publish(job_id, job_type)
            ok.append(job_id)
        except Exception as e:  # noqa: BLE001 - any broker failure: try again next pass
            log.warning("reconciler could not publish job %s: %s", job_id, type(e).__name__)
            failed.append(job_id)
            with db.transaction() as session:
                session.execute(update(Job).where(Job.id == job_id).values(dispatched_at=None)
                                .execution_options(synchronize_session=False))


def reconcile(db: Database, settings: Settings, publish: Publisher, *,
              now: dt.datetime | None = None) -> ReconcileReport:
    """One reconciliation pass; see the module docstring."""
    now = now or utcnow()
    report = ReconcileReport()
    _expire_leases(db, now, report)
    _expire_deadlines(db, settings, now, report)
    # Jobs of external families wait in the database for rpop; never publish them.
    celery = Job.family.notin_(sorted(settings.external_families)) if settings.external_families \
        else Job.family.isnot(None)
    unpublished = _take_for_publish(
        db, and_(celery, Job.dispatched_at.is_(None),
                 or_(Job.created_at < now - dt.timedelta(seconds=settings.publish_grace),
                     Job.attempts > 0)), now)
    _publish(db, publish, unpublished, report.published, report.publish_failed)
    stale = _take_for_publish(
        db, and_(celery, Job.dispatched_at < now - dt.timedelta(seconds=settings.reoffer_after)), now)
    _publish(db, publish, stale, report.reoffered, report.publish_failed)
    idempotency.purge(db)
    if any(report.as_dict().values()):
        log.info("reconciled: %s", report.as_dict())
    return report
