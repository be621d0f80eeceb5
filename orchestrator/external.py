"""External workers (CONTRACT §3–§5): GPU boxes outside the Celery cluster that
take jobs over HTTP, Upstash-REST style, upload their files and call back.

A popped job is leased, not lost: claiming it moves it ``queued →
processing`` with a lease of its type's hard time limit; a ``processing``
callback renews the lease; a job whose worker goes silent is requeued by the
reconciler (or failed when its attempts are used up).
"""
from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, select

from orchestrator import completion
from orchestrator.callbacks import CallbackReport
from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.errors import Conflict
from orchestrator.jobtypes import JOB_TYPES, Family, JobType
from orchestrator.models import Job, utcnow
from orchestrator.records import iso
from orchestrator.status import JobStatus

CLAIM_TRIES = 5


def family_of_list(name: str) -> Family | None:
    """``sdxl_queue`` → SDXL, ``wan_queue`` → WAN, anything else None."""
    for family in Family:
        if family.legacy_list == name:
            return family
    return None


def lease_seconds(spec: JobType, settings: Settings) -> int:
    """How long an external worker may stay silent: its type's hard time limit
    (``EXTERNAL_LEASE_SECONDS`` overrides it for every type)."""
    return settings.external_lease_seconds or spec.hard_time_limit


def legacy_payload(job: Job) -> dict[str, Any]:
    """The job as the old workers read it (CONTRACT §3); absent ids are omitted."""
    spec = JOB_TYPES[job.job_type]
    meta = dict(job.metadata_ or {})
    payload: dict[str, Any] = {
        "id": job.id,
        "type": job.job_type,
        "prompt": job.prompt,
        "config": {
            "size": spec.size,
            "sample_steps": spec.steps,
            "sample_guide_scale": spec.guidance,
            "sample_solver": spec.sample_solver,
            "sample_shift": spec.sample_shift,
            "frame_num": spec.frames,
            "enhance_prompt": spec.enhanced,
            "expected_time": spec.expected_seconds,
            "content_type": spec.content_type,
            "file_extension": spec.file_extension,
            "num_images": int(meta.get("num_images") or spec.outputs),
        },
        "user_id": job.user_id,
        "created_at": iso(job.created_at),
        "model_variant": job.model_variant,
        "bucket": spec.bucket,
        "metadata": meta,
        # Not in the legacy payload: lets a worker fence its callbacks.
        "attempt": job.attempts,
        "seed": job.seed,
    }
    if spec.is_sdxl:
        payload["negative_prompt"] = job.negative_prompt
    if spec.is_video and job.video_id:
        payload["video_id"] = job.video_id
    if not spec.is_video and job.image_id:
        payload["image_id"] = job.image_id
    if meta.get("character_id"):
        payload["character_id"] = meta["character_id"]
    return payload


def claim_next(db: Database, settings: Settings, family: Family, *, worker: str) -> Job | None:
    """Lease the oldest queued job of ``family`` to ``worker`` (None: nothing waits).

    Two workers never get the same job: the claim is the same compare-and-set
    as a Celery worker's, and on PostgreSQL candidates are read ``SKIP LOCKED``
    so concurrent pollers take different rows instead of colliding.
    """
    for _ in range(CLAIM_TRIES):
        with db.transaction() as session:
            stmt = (select(Job.id, Job.job_type)
                    .where(Job.family == family.value, Job.status == JobStatus.QUEUED.value,
                           Job.attempts < Job.max_attempts)
                    .order_by(Job.created_at, Job.id).limit(1))
            if db.dialect == "postgresql":
                stmt = stmt.with_for_update(skip_locked=True)
            row = session.execute(stmt).first()
            if row is None:
                return None
        job_id, job_type = row
        job = completion.start_job(db, job_id, worker=worker,
                                   lease_seconds=lease_seconds(JOB_TYPES[job_type], settings))
        if job is not None:
            return job
    return None


def apply_callback(db: Database, settings: Settings, report: CallbackReport) -> completion.Transition:
    """A callback for a job of an external family: only a live lease may change it.

    ``processing`` renews the lease; ``completed``/``failed`` end the job. A
    callback for a job that is not leased (its lease expired and it went back
    to the queue) is refused without effect; one for a job that already ended
    changes nothing and answers as before.

    Raises:
        Conflict: the job is not leased (or not by this attempt).
    """
    now = utcnow()
    live = (completion.JOBS.c.status == JobStatus.PROCESSING.value,
            completion.JOBS.c.lease_expires_at > now)
    if report.status is JobStatus.PROCESSING:
        job = completion.renew(db, report.job_id, report.outcome.attempt,
                               lease_seconds(JOB_TYPES[report.job_type], settings), guards=live)
        result = completion.Transition(job, False) if job is not None else None
    else:
        result = completion.finish_job(db, report.job_id, report.outcome, guards=live)
        if not result.changed:
            result = None
    if result is not None:
        return result
    with db.session() as session:
        job = session.get(Job, report.job_id)
    if job is not None and JobStatus(job.status).is_terminal:
        return completion.Transition(job, False)
    raise Conflict("The job is not leased to this worker (its lease expired); nothing changed",
                   details={"status": job.status if job else None})


def waiting(db: Database, family: Family) -> int:
    with db.session() as session:
        return session.execute(select(func.count()).select_from(Job).where(
            Job.family == family.value, Job.status == JobStatus.QUEUED.value)).scalar_one()


def holds_lease(db: Database, *, bucket: str, owner: str, now: dt.datetime | None = None) -> bool:
    """Is a job of this bucket and owner leased right now (uploads are allowed only then)?"""
    now = now or utcnow()
    with db.session() as session:
        return session.execute(select(Job.id).where(
            Job.job_type == bucket, Job.user_id == owner,
            Job.status == JobStatus.PROCESSING.value, Job.lease_expires_at > now).limit(1)
        ).first() is not None
