"""Submitting a job (CONTRACT §2): validate, resolve the prompt, charge, record.

One transaction creates the job, its image/video row, the ledger entry and the
events, and debits the balance; the caller publishes to the broker only after
it commits (DESIGN principle 2).
"""
from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from sqlalchemy import insert, inspect as sa_inspect, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from orchestrator import credits, events, idempotency, metrics
from orchestrator.db import Database
from orchestrator.errors import Conflict, InvalidRequest, NotFound
from orchestrator.idempotency import KeyedRequest, StoredAnswer
from orchestrator.jobtypes import JOB_TYPES, VALID_JOB_TYPES, JobType
from orchestrator.models import Image, Job, Project, Video, utcnow
from orchestrator.queries import canonical_uuid, unstorable
from orchestrator.prompts import build_negative_prompt
from orchestrator.status import AssetStatus, JobStatus

MAX_PROMPT_CHARS = 4000
TITLE_CHARS = 60


@dataclass(frozen=True)
class SubmitRequest:
    """A validated-for-shape request; the rules that need the job type live here."""

    job_type: str
    metadata: dict[str, Any] = field(default_factory=dict)
    project_id: str | None = None
    image_id: str | None = None
    video_id: str | None = None


@dataclass(frozen=True)
class Submitted:
    job: Job
    spec: JobType
    queue_length: int
    balance: int
    answer: StoredAnswer | None = None


#: Builds the client's answer inside the submitting transaction (for Idempotency-Key).
Answer = Callable[["Submitted"], tuple[int, dict[str, Any]]]


class DuplicateKey(Conflict):
    """Another request with the same Idempotency-Key committed first."""


def derive_seed(job_id: str) -> int:
    """A stable 32-bit seed from the job id, for jobs that did not ask for one."""
    return int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:4], "big")


def resolve_job_type(name: str) -> JobType:
    try:
        return JOB_TYPES[name]
    except KeyError:
        raise InvalidRequest(f"Invalid job type: {name!r}",
                             details={"valid_job_types": list(VALID_JOB_TYPES)}) from None


def _int_option(metadata: dict[str, Any], name: str, lo: int, hi: int, default: int) -> int:
    value = metadata.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidRequest(f"metadata.{name} must be an integer from {lo} to {hi}",
                             details={"field": f"metadata.{name}"})
    return value


def _check_ids(spec: JobType, req: SubmitRequest) -> SubmitRequest:
    """Type-appropriate ids, each in its canonical spelling; metadata the databases can store."""
    if req.image_id and spec.is_video:
        raise InvalidRequest("imageId is only valid for image jobs", details={"field": "imageId"})
    if req.video_id and not spec.is_video:
        raise InvalidRequest("videoId is only valid for video jobs", details={"field": "videoId"})
    bad = unstorable(req.metadata, "metadata")
    if bad is not None:
        raise InvalidRequest(f"{bad} holds a non-finite number or invalid Unicode",
                             details={"field": bad})
    ids: dict[str, str | None] = {}
    for name, attr in (("projectId", "project_id"), ("imageId", "image_id"), ("videoId", "video_id")):
        value = getattr(req, attr)
        ids[attr] = canonical_uuid(value)
        if value is not None and ids[attr] is None:
            raise InvalidRequest(f"{name} must be a uuid", details={"field": name})
    return replace(req, **ids)


def _resolve_prompt(session: Session, user_id: str, req: SubmitRequest) -> tuple[str, Project | None]:
    """Project's enhanced prompt → project's original prompt → metadata.prompt."""
    project = None
    if req.project_id:
        project = session.execute(
            select(Project).where(Project.id == req.project_id, Project.user_id == user_id)
        ).scalar_one_or_none()
        if project is None:
            raise NotFound("Project not found")
    raw = req.metadata.get("prompt")
    if raw is not None and not isinstance(raw, str):
        raise InvalidRequest("metadata.prompt must be a string", details={"field": "metadata.prompt"})
    candidates = [project.enhanced_prompt, project.original_prompt] if project else []
    prompt = next((p.strip() for p in [*candidates, raw] if p and p.strip()), "")
    if not prompt:
        raise InvalidRequest("A prompt is required (metadata.prompt or a project with a prompt)",
                             details={"field": "metadata.prompt"})
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidRequest(f"prompt is longer than {MAX_PROMPT_CHARS} characters",
                             details={"field": "metadata.prompt"})
    return prompt, project


def _negative_prompt(spec: JobType, prompt: str, metadata: dict[str, Any]) -> str | None:
    if not spec.is_sdxl:
        return None
    built = build_negative_prompt(prompt)
    extra = metadata.get("negative_prompt")
    if extra is not None and not isinstance(extra, str):
        raise InvalidRequest("metadata.negative_prompt must be a string",
                             details={"field": "metadata.negative_prompt"})
    if extra is not None and len(extra) > MAX_PROMPT_CHARS:
        raise InvalidRequest(f"negative_prompt is longer than {MAX_PROMPT_CHARS} characters",
                             details={"field": "metadata.negative_prompt"})
    return f"{extra.strip()}, {built}" if extra and extra.strip() else built


def _attach_asset(session: Session, job: Job, spec: JobType, req: SubmitRequest) -> Image | Video:
    """Reuse the row the client pre-created (its own only) or create one."""
    now = utcnow()
    model = Video if spec.is_video else Image
    given = req.video_id if spec.is_video else req.image_id
    fields: dict[str, Any] = dict(status=AssetStatus.QUEUED.value, prompt=job.prompt,
                                  quality=spec.quality, updated_at=now, completed_at=None,
                                  thumbnail_url=None)
    if given:
        # Only the caller's own jobs: another user's busy row is a 404 like any
        # other user's row (never a 409 naming their job).
        busy = session.execute(select(Job.id).where(
            (Job.video_id if spec.is_video else Job.image_id) == given, Job.user_id == job.user_id,
            Job.status.in_((JobStatus.QUEUED.value, JobStatus.PROCESSING.value))).limit(1)
        ).scalar_one_or_none()
        if busy is not None:
            raise Conflict("That image/video is already being generated by another job",
                           details={"job_id": busy})
        fields.update(dict(video_url=None) if spec.is_video else dict(image_url=None, image_urls=None))
        asset = session.execute(
            update(model).where(model.id == given, model.user_id == job.user_id)
            .values(**fields).returning(model)
            .execution_options(synchronize_session=False)
        ).scalar_one_or_none()
        if asset is None:
            raise NotFound(f"{'Video' if spec.is_video else 'Image'} not found")
        asset.metadata_ = {**(asset.metadata_ or {}), "bucket": spec.bucket, "job_id": job.id}
        return asset
    common = dict(id=str(uuid.uuid4()), user_id=job.user_id, project_id=job.project_id,
                  title=job.prompt[:TITLE_CHARS], created_at=now,
                  metadata_={"bucket": spec.bucket, "job_id": job.id, "job_type": spec.name},
                  enhanced_prompt=None, **fields)
    if spec.is_video:
        asset = Video(video_url=None, duration=round(spec.frames / spec.fps, 3),
                      resolution=f"{spec.width}x{spec.height}", format="mp4", **common)
    else:
        asset = Image(image_url=None, image_urls=None, generation_mode=spec.name, **common)
    session.execute(insert(model.__table__), _values(asset))
    return asset


_COLUMNS: dict[type, list[tuple[str, str]]] = {}


def _values(obj: Any) -> dict[str, Any]:
    """A new ORM object's column values, for a Core INSERT (no unit of work, no flush)."""
    cls = type(obj)
    if cls not in _COLUMNS:
        _COLUMNS[cls] = [(a.columns[0].key, a.key) for a in sa_inspect(cls).column_attrs]
    return {column: getattr(obj, attr) for column, attr in _COLUMNS[cls]}


def _wait_hint(spec: JobType) -> int:
    """Retry-After for a user at the active-jobs cap: about one job's run time."""
    return max(5, min(60, int(spec.expected_seconds)))


def submit_job(db: Database, user_id: str, req: SubmitRequest, *, max_attempts: int,
               max_active: int = 0, key: KeyedRequest | None = None,
               answer: Answer | None = None) -> Submitted:
    """Record and charge a new job; commit before returning.

    With ``key`` and ``answer``, the client's answer is stored under its
    Idempotency-Key in the same transaction as the job.

    Raises:
        InvalidRequest: unknown type, bad ids or options, no prompt.
        NotFound: the project or image/video is not this user's.
        InsufficientCredits: the balance is below the type's price.
        RateLimited: the user has ``max_active`` jobs queued or processing.
        DuplicateKey: a concurrent request with the same key won.
    """
    spec = resolve_job_type(req.job_type)
    req = _check_ids(spec, req)
    metadata = dict(req.metadata)
    num_outputs = _int_option(metadata, "num_images", 1, spec.outputs, spec.outputs)
    job_id = str(uuid.uuid4())
    seed = _int_option(metadata, "seed", 0, 2**32 - 1, derive_seed(job_id))
    with db.transaction() as session:
        prompt, project = _resolve_prompt(session, user_id, req)
        # First statement: it locks the user's profile row (event order, see events).
        charge = credits.debit(session, user_id, spec.credits, max_active=max_active,
                               retry_after=_wait_hint(spec), queued_family=spec.family.value)
        now = utcnow()
        job = Job(
            id=job_id, user_id=user_id, job_type=spec.name, family=spec.family.value,
            format=spec.format, quality=spec.quality, model_variant=spec.model_variant,
            status=JobStatus.QUEUED.value, prompt=prompt,
            negative_prompt=_negative_prompt(spec, prompt, metadata), enhanced_prompt=None,
            metadata_={**metadata, "num_images": num_outputs, "bucket": spec.bucket},
            result=None, project_id=project.id if project else None, image_id=None,
            video_id=None, seed=seed, credits=spec.credits, charges=1, progress=0, attempts=0,
            max_attempts=max_attempts, error_message=None, lease_owner=None,
            lease_expires_at=None, created_at=now, updated_at=now, queued_at=now, dispatched_at=None,
            started_at=None, completed_at=None,
        )
        asset = _attach_asset(session, job, spec, req)  # first: the job references it
        if spec.is_video:
            job.video_id = asset.id
        else:
            job.image_id = asset.id
        session.execute(insert(Job.__table__), _values(job))
        credits.record(session, user_id=user_id, job_id=job_id, delta=-spec.credits,
                       reason="job_charge", balance_after=charge.balance, charge_no=1)
        events.write(session, events.job_event(job, "queued"), events.asset_event(asset, job_id))
        # The count ran before this job's row existed: it is last in its queue.
        submitted = Submitted(job=job, spec=spec, queue_length=charge.queued + 1,
                              balance=charge.balance)
        if key is not None and answer is not None:
            status, body = answer(submitted)
            try:
                idempotency.store(session, key, status, body, job_id)
            except IntegrityError as e:
                raise DuplicateKey("A request with this Idempotency-Key was just accepted") from e
            submitted = replace(submitted, answer=StoredAnswer(status, body))
    metrics.job_created(spec.name)  # committed: the one place a submission is counted
    return submitted


def retry_job(db: Database, user_id: str, job_id: str, *, max_attempts: int,
              max_active: int = 0) -> Submitted:
    """Requeue a failed job as a new run: charged again, refunded again if it fails.

    Attempt numbers keep counting (so a late writer of an old run stays
    fenced off); the new run gets ``max_attempts`` more of them.

    Raises:
        NotFound: no such job of this user.
        Conflict: the job is not failed.
        InsufficientCredits: the balance is below the job's price.
        RateLimited: the user has ``max_active`` jobs queued or processing.
    """
    job_id = canonical_uuid(job_id)  # type: ignore[assignment]
    if job_id is None:
        raise NotFound("Job not found")
    with db.transaction() as session:
        job = session.execute(select(Job).where(Job.id == job_id, Job.user_id == user_id)
                              ).scalar_one_or_none()
        if job is None:
            raise NotFound("Job not found")
        if job.status != JobStatus.FAILED.value:
            raise Conflict(f"Only failed jobs can be retried; this one is {job.status}",
                           details={"status": job.status})
        charge = credits.debit(session, user_id, job.credits, max_active=max_active,
                               retry_after=_wait_hint(JOB_TYPES[job.job_type]),
                               queued_family=job.family)
        balance = charge.balance
        charge_no = job.charges + 1
        meta = {k: v for k, v in (job.metadata_ or {}).items()
                if k not in ("primary_asset", "all_assets")}
        job = session.execute(
            update(Job).where(Job.id == job_id, Job.status == JobStatus.FAILED.value,
                              Job.charges == job.charges)
            .values(status=JobStatus.QUEUED.value, charges=charge_no, progress=0,
                    max_attempts=Job.attempts + max_attempts, error_message=None, result=None,
                    completed_at=None, dispatched_at=None, queued_at=utcnow(), lease_owner=None,
                    lease_expires_at=None, metadata_=meta, updated_at=utcnow())
            .returning(Job).execution_options(synchronize_session=False, populate_existing=True)
        ).scalar_one_or_none()
        if job is None:
            raise Conflict("The job changed while it was being retried")
        credits.record(session, user_id=user_id, job_id=job_id, delta=-job.credits,
                       reason="job_charge", balance_after=balance, charge_no=charge_no)
        asset = (session.get(Video, job.video_id) if job.video_id
                 else session.get(Image, job.image_id) if job.image_id else None)
        evs = [events.job_event(job, "retried")]
        if asset is not None:
            asset.status = AssetStatus.QUEUED.value
            asset.completed_at = None
            asset.updated_at = utcnow()
            session.flush()
            evs.append(events.asset_event(asset, job_id))
        events.append(session, *evs)
        session.flush()
        spec = JOB_TYPES[job.job_type]
        # Counted while this job was still failed: it is last in its queue.
        submitted = Submitted(job=job, spec=spec, queue_length=charge.queued + 1,
                              balance=balance)
    metrics.job_created(spec.name)  # committed: a retry is a new run
    return submitted
