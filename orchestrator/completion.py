"""Every change of a job after submission, as guarded compare-and-set updates.

Two doors lead here: Celery signals (in-house workers) and the HTTP callback
(external workers). Each function is one transaction that starts with a CAS
``UPDATE jobs … WHERE id = :id AND status IN (…) [AND attempts = :attempt]``;
when the guard is closed (a duplicate delivery, a late callback, a stale
attempt) nothing changes and the current row is returned. The transaction that
wins a terminal transition is the only one that touches the asset row and the
only one that refunds, so each happens once.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.orm import Session

from orchestrator import credits, events, metrics
from orchestrator.db import Database
from orchestrator.errors import Conflict, NotFound
from orchestrator.models import Image, Job, Video, utcnow
from orchestrator.queries import canonical_uuid
from orchestrator.status import ASSET_STATUS_FOR, JobStatus, sources_of

TITLE_CHARS = 60
ERROR_CHARS = 2000


@dataclass(frozen=True)
class Outcome:
    """How a run ended, as reported by a worker (either door)."""

    status: JobStatus  # COMPLETED, FAILED or CANCELLED
    attempt: int | None = None  # None: an unfenced legacy callback
    assets: list[str] = field(default_factory=list)  # paths relative to the job's bucket
    thumbnail: str | None = None
    error: str | None = None
    enhanced_prompt: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Transition:
    job: Job
    changed: bool


def _cas(session: Session, job_id: str, sources: tuple[str, ...], attempt: int | None,
         *guards: Any, **values: Any) -> Job | None:
    stmt = update(Job).where(Job.id == job_id, Job.status.in_(sources), *guards)
    if attempt is not None:
        stmt = stmt.where(Job.attempts == attempt)
    stmt = stmt.values(updated_at=utcnow(), **values).returning(Job)
    return session.execute(stmt.execution_options(
        synchronize_session=False, populate_existing=True)).scalar_one_or_none()


def _load(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound("Job not found")
    return job


def _asset(session: Session, job: Job) -> Image | Video | None:
    if job.video_id:
        return session.get(Video, job.video_id)
    if job.image_id:
        return session.get(Image, job.image_id)
    return None


def _sync_asset(session: Session, job: Job, outcome: Outcome | None = None) -> Image | Video | None:
    """Mirror the job's status onto its image/video row (CONTRACT §5)."""
    asset = _asset(session, job)
    if asset is None:
        return None
    status = JobStatus(job.status)
    now = utcnow()
    asset.status = ASSET_STATUS_FOR[status].value
    asset.updated_at = now
    if job.enhanced_prompt:
        asset.enhanced_prompt = job.enhanced_prompt
    meta = dict(asset.metadata_ or {})
    if status is JobStatus.COMPLETED and outcome is not None:
        first = outcome.assets[0]
        asset.title = job.prompt[:TITLE_CHARS]
        asset.completed_at = now
        if isinstance(asset, Image):
            asset.image_url = first
            asset.image_urls = list(outcome.assets) if len(outcome.assets) > 1 else None
            asset.thumbnail_url = outcome.thumbnail or first
        else:
            asset.video_url = first
            asset.thumbnail_url = outcome.thumbnail
            asset.completed_at = now
        meta.update({k: v for k, v in outcome.metadata.items() if k in ("seeds", "generator")})
    elif status.is_terminal:
        meta["error"] = job.error_message
    asset.metadata_ = meta
    return asset


def _emit(session: Session, job: Job, asset: Image | Video | None, kind: str | None = None) -> None:
    session.flush()
    evs = [events.job_event(job, kind)]
    if asset is not None:
        evs.append(events.asset_event(asset, job.id))
    events.append(session, *evs)


def start_job(db: Database, job_id: str, *, worker: str, lease_seconds: int) -> Job | None:
    """Claim a job for a worker: ``queued → processing``, next attempt, a lease.

    A ``processing`` job whose lease has expired (its worker died) may be
    claimed too, so a redelivered message need not wait for the reconciler.
    Returns the claimed job, or None when the job is not claimable (running
    elsewhere, finished, cancelled) or out of attempts: do no work.
    """
    now = utcnow()
    claimable = or_(Job.status == JobStatus.QUEUED.value,
                    and_(Job.status == JobStatus.PROCESSING.value, Job.lease_expires_at < now))
    with db.transaction() as session:
        job = _cas(session, job_id, (JobStatus.QUEUED.value, JobStatus.PROCESSING.value), None,
                   claimable, Job.attempts < Job.max_attempts,
                   status=JobStatus.PROCESSING.value, attempts=Job.attempts + 1, progress=0,
                   started_at=now, lease_owner=worker, error_message=None,
                   lease_expires_at=now + dt.timedelta(seconds=lease_seconds))
        if job is not None:
            _emit(session, job, _sync_asset(session, job))
        else:
            current = session.get(Job, job_id)
    if job is not None:
        metrics.job_started(job, now)  # committed, and this claim won
        return job
    if current is not None and current.attempts >= current.max_attempts and (
            current.status == JobStatus.QUEUED.value
            or (current.status == JobStatus.PROCESSING.value
                and current.lease_expires_at is not None and current.lease_expires_at < now)):
        # Out of attempts: end the job instead of looping on it.
        fail_exhausted(db, current)
    return None


def fail_exhausted(db: Database, job: Job, *, now: dt.datetime | None = None) -> Transition:
    """End a job whose every attempt was used (its workers kept dying)."""
    return finish_job(db, job.id, Outcome(
        JobStatus.FAILED, attempt=job.attempts,
        error=f"worker lost; all {job.max_attempts} attempts used"),
        guards=(or_(Job.status == JobStatus.QUEUED.value,
                    Job.lease_expires_at < (now or utcnow())),))


def renew(db: Database, job_id: str, attempt: int | None, lease_seconds: int, *,
          guards: tuple[Any, ...] = ()) -> Job | None:
    """Extend a running job's lease; the job, or None when the run is not current."""
    with db.transaction() as session:
        return _cas(session, job_id, (JobStatus.PROCESSING.value,), attempt, *guards,
                    lease_expires_at=utcnow() + dt.timedelta(seconds=lease_seconds))


def renew_lease(db: Database, job_id: str, attempt: int, lease_seconds: int) -> bool:
    """Extend a running job's lease. False: the run is no longer current (stop)."""
    return renew(db, job_id, attempt, lease_seconds) is not None


def requeue_expired(db: Database, job_id: str, attempt: int, *,
                    now: dt.datetime | None = None) -> bool:
    """A dead worker's job, attempts left: ``processing → queued``, to be published again."""
    with db.transaction() as session:
        job = _cas(session, job_id, (JobStatus.PROCESSING.value,), attempt,
                   Job.lease_expires_at < (now or utcnow()), Job.attempts < Job.max_attempts,
                   status=JobStatus.QUEUED.value, lease_owner=None, lease_expires_at=None,
                   dispatched_at=None, progress=0,
                   error_message=f"worker lost during attempt {attempt}; requeued")
        if job is None:
            return False
        _emit(session, job, _sync_asset(session, job), "requeued")
        return True


def report_processing(db: Database, job_id: str, *, worker: str, lease_seconds: int,
                      attempt: int | None = None) -> Transition:
    """An external worker says it is working: claim a queued job or renew the lease."""
    now = utcnow()
    lease = now + dt.timedelta(seconds=lease_seconds)
    with db.transaction() as session:
        job = _cas(session, job_id, (JobStatus.QUEUED.value,), attempt,
                   Job.attempts < Job.max_attempts,
                   status=JobStatus.PROCESSING.value, attempts=Job.attempts + 1, progress=0,
                   started_at=func.coalesce(Job.started_at, now), lease_owner=worker,
                   lease_expires_at=lease, error_message=None)
        if job is not None:
            _emit(session, job, _sync_asset(session, job))
            result = Transition(job, True)
        else:
            job = _cas(session, job_id, (JobStatus.PROCESSING.value,), attempt,
                       lease_expires_at=lease)
            result = Transition(job if job is not None else _load(session, job_id), False)
    if result.changed:
        metrics.job_started(result.job, now)  # committed, and this claim won
    return result


def record_progress(db: Database, job_id: str, attempt: int, progress: int, *,
                    lease_seconds: int) -> bool:
    """Store progress (0–100) and renew the lease. False: the run was cancelled
    or superseded, and the worker should stop."""
    now = utcnow()
    with db.transaction() as session:
        job = _cas(session, job_id, (JobStatus.PROCESSING.value,), attempt,
                   progress=max(0, min(100, progress)),
                   lease_expires_at=now + dt.timedelta(seconds=lease_seconds))
        if job is None:
            return False
        events.append(session, events.job_event(job, "progress"))
        return True


def record_enhancement(db: Database, job_id: str, attempt: int, *, prompt: str, backend: str,
                       error: str | None) -> bool:
    """Store the enhanced prompt (and why enhancement failed, if it did)."""
    with db.transaction() as session:
        job = _cas(session, job_id, (JobStatus.PROCESSING.value,), attempt, enhanced_prompt=prompt)
        if job is None:
            return False
        meta = dict(job.metadata_ or {})
        meta["enhancement"] = {"backend": backend, "error": error}
        job.metadata_ = meta
        _emit(session, job, _sync_asset(session, job), "enhanced")
        return True


def finish_job(db: Database, job_id: str, outcome: Outcome, *, guards: tuple[Any, ...] = ()) -> Transition:
    """End a job: completed, failed or cancelled. Idempotent.

    A completion with no assets is a failure. Failed and cancelled jobs are
    refunded by the one transaction that ends them.
    """
    if outcome.status is JobStatus.COMPLETED and not outcome.assets:
        outcome = Outcome(JobStatus.FAILED, attempt=outcome.attempt,
                          error="worker reported completion without any assets",
                          enhanced_prompt=outcome.enhanced_prompt, metadata=outcome.metadata)
    status = outcome.status
    now = utcnow()
    values: dict[str, Any] = dict(
        status=status.value, completed_at=now, lease_owner=None, lease_expires_at=None,
    )
    if status is JobStatus.COMPLETED:
        # An external worker may report completion without a processing
        # callback first: the run still happened, once.
        values["started_at"] = func.coalesce(Job.started_at, now)
        values["attempts"] = case((Job.attempts == 0, 1), else_=Job.attempts)
        values["progress"] = 100
        values["error_message"] = None
    else:
        values["error_message"] = (outcome.error or status.value)[:ERROR_CHARS]
    if outcome.enhanced_prompt:
        values["enhanced_prompt"] = outcome.enhanced_prompt
    sources = tuple(s for s in sources_of(status) if s != JobStatus.FAILED.value)
    with db.transaction() as session:
        job = _cas(session, job_id, sources, outcome.attempt, *guards, **values)
        if job is None:
            return Transition(_load(session, job_id), False)
        meta = dict(job.metadata_ or {})
        if status is JobStatus.COMPLETED:
            job.result = {"bucket": job.job_type, "assets": list(outcome.assets),
                          "thumbnail": outcome.thumbnail, **outcome.metadata}
            meta.update(primary_asset=outcome.assets[0], all_assets=list(outcome.assets))
            job.metadata_ = meta
        else:
            credits.refund(session, user_id=job.user_id, job_id=job.id, amount=job.credits,
                           charge_no=job.charges)
        _emit(session, job, _sync_asset(session, job, outcome))
    # Committed, and only the transaction whose guard let it through gets here:
    # the one place a job's end is counted.
    metrics.job_finished(job)
    return Transition(job, True)


def release(db: Database, job_id: str) -> bool:
    """A worker gives a leased job back (``lpush``): ``processing → queued``."""
    with db.transaction() as session:
        job = _cas(session, job_id, (JobStatus.PROCESSING.value,), None,
                   status=JobStatus.QUEUED.value, lease_owner=None, lease_expires_at=None,
                   progress=0)
        if job is None:
            return False
        _emit(session, job, _sync_asset(session, job), "released")
        return True


def fail_timed_out(db: Database, job_id: str, *, host: str) -> Transition:
    """The worker host killed the job past its hard time limit: fail that run
    (guarded by the lease this host holds; a run elsewhere is not touched)."""
    return finish_job(db, job_id, Outcome(JobStatus.FAILED, error="generation timed out"),
                      guards=(Job.status == JobStatus.PROCESSING.value,
                              Job.lease_owner.like(f"{host}:%")))


def requeue_for_retry(db: Database, job_id: str, attempt: int, reason: str) -> bool:
    """A transient error: ``processing → queued`` so the retried delivery can claim it.

    Called by the task before it publishes the retry, so the retried message
    can never arrive while the job still looks busy.
    """
    with db.transaction() as session:
        job = _cas(session, job_id, (JobStatus.PROCESSING.value,), attempt,
                   status=JobStatus.QUEUED.value, lease_owner=None, lease_expires_at=None,
                   error_message=reason[:ERROR_CHARS], progress=0, dispatched_at=utcnow())
        if job is None:
            return False
        _emit(session, job, _sync_asset(session, job), "retrying")
        return True


def cancel_job(db: Database, user_id: str, job_id: str) -> Job:
    """A user cancels their job: queued or running, it ends ``cancelled`` now.

    A running worker notices at its next progress report and stops; its
    completion finds the guard closed.

    Raises:
        NotFound: no such job of this user.
        Conflict: the job already completed or failed (a cancelled one is answered again).
    """
    owner = None
    job_id = canonical_uuid(job_id)  # type: ignore[assignment]
    if job_id is not None:
        with db.session() as session:
            owner = session.execute(select(Job.user_id).where(Job.id == job_id)).scalar_one_or_none()
    if owner != user_id:
        raise NotFound("Job not found")
    result = finish_job(db, job_id, Outcome(JobStatus.CANCELLED, error="cancelled by user"))
    if not result.changed and result.job.status != JobStatus.CANCELLED.value:
        raise Conflict(f"Job already {result.job.status}", details={"status": result.job.status})
    return result.job


def mark_dispatched(db: Database, job_id: str) -> None:
    """Note that the job's message reached the broker (the reconciler reads this)."""
    with db.transaction() as session:
        session.execute(update(Job).where(Job.id == job_id, Job.dispatched_at.is_(None))
                        .values(dispatched_at=utcnow())
                        .execution_options(synchronize_session=False))
