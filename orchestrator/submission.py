"""Submitting a job (CONTRACT §2): validate, resolve the prompt, charge, record.

One transaction creates the job, its image/video row, the ledger entry and the
events, and debits the balance; the caller publishes to the broker only after
it commits (DESIGN principle 2).
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
import weakref
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
from orchestrator.models import CreditEntry, Image, Job, Project, Video, utcnow
from orchestrator.queries import canonical_uuid, unstorable
from orchestrator.records import iso
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


def _resolve_prompt(session: Session | None, user_id: str,
                    req: SubmitRequest) -> tuple[str, Project | None]:
    """Project's enhanced prompt → project's original prompt → metadata.prompt (``session``
    reads the project; None only for a request without one)."""
    project = None
    if req.project_id:
        assert session is not None
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
    model = Video if spec.is_video else Image
    given = req.video_id if spec.is_video else req.image_id
    fields = _asset_fields(job, spec)
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
    asset = _new_asset(job, spec)
    session.execute(insert(model.__table__), _values(asset))
    return asset


def _asset_fields(job: Job, spec: JobType) -> dict[str, Any]:
    """What a job (re)sets on its image/video row when it is queued."""
    return dict(status=AssetStatus.QUEUED.value, prompt=job.prompt, quality=spec.quality,
                updated_at=job.created_at, completed_at=None, thumbnail_url=None)


def _new_asset(job: Job, spec: JobType) -> Image | Video:
    """The image/video row a job creates when the client did not pre-create one."""
    common = dict(id=str(uuid.uuid4()), user_id=job.user_id, project_id=job.project_id,
                  title=job.prompt[:TITLE_CHARS], created_at=job.created_at,
                  metadata_={"bucket": spec.bucket, "job_id": job.id, "job_type": spec.name},
                  enhanced_prompt=None, **_asset_fields(job, spec))
    if spec.is_video:
        return Video(video_url=None, duration=round(spec.frames / spec.fps, 3),
                     resolution=f"{spec.width}x{spec.height}", format="mp4", **common)
    return Image(image_url=None, image_urls=None, generation_mode=spec.name, **common)


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


class QueueLengths:
    """The answer's queue length per family, counted by the database at most every
    ``max_age`` seconds per process (counting a deep queue visits every queued row, the
    largest cost of a submission to PostgreSQL); in between, the last count plus the jobs
    this process has queued since. So it can lag the truth by the jobs other processes
    queued, and the jobs workers took, in the last ``max_age`` seconds: the number a user
    sees is "about N ahead", never a guarantee. ``max_age`` 0: counted every time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: dict[str, tuple[float, int]] = {}  # family → (when counted, length)

    def fresh(self, family: str, max_age: float) -> bool:
        known = self._known.get(family)
        return known is not None and time.monotonic() - known[0] < max_age

    def next(self, family: str, waiting: int | None) -> int:
        """This job's place: after the ``waiting`` jobs the database just counted, or (None:
        not counted, the last count is fresh) after the ones this process knows of."""
        with self._lock:
            if waiting is None:
                when, waiting = self._known[family]
            else:
                when = time.monotonic()
            self._known[family] = (when, waiting + 1)
        return waiting + 1


_queue_lengths: "weakref.WeakKeyDictionary[Database, QueueLengths]" = weakref.WeakKeyDictionary()


def queue_lengths(db: Database) -> QueueLengths:
    """This process's queue lengths for ``db``."""
    try:
        return _queue_lengths[db]
    except KeyError:
        return _queue_lengths.setdefault(db, QueueLengths())


def submit_job(db: Database, user_id: str, req: SubmitRequest, *, max_attempts: int,
               max_active: int = 0, key: KeyedRequest | None = None,
               answer: Answer | None = None, queue_length_max_age: float = 0.0) -> Submitted:
    """Record and charge a new job; commit before returning.

    With ``key`` and ``answer``, the client's answer is stored under its
    Idempotency-Key in the same transaction as the job. The answer's queue length is
    counted, or estimated within ``queue_length_max_age`` seconds (:class:`QueueLengths`).

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

    def new_job(prompt: str, project: Project | None) -> Job:
        now = utcnow()
        return Job(
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

    lengths, family = queue_lengths(db), spec.family.value
    count = not lengths.fresh(family, queue_length_max_age)
    if db.dialect == "postgresql" and not (req.project_id or req.image_id or req.video_id or key):
        job = new_job(*_resolve_prompt(None, user_id, req))
        charged = _submit_in_one_statement(db, spec, job, max_active, count)
        if charged is not None:
            balance, waiting = charged
            metrics.job_created(spec.name)  # committed: the one place a submission is counted
            return Submitted(job=job, spec=spec, balance=balance,
                             queue_length=lengths.next(family, waiting))
        # Nothing was written: a user without a profile, short of credits or at the cap.
        # The transaction below creates the profile or raises the error that says which.
    with db.transaction() as session:
        prompt, project = _resolve_prompt(session, user_id, req)
        # First statement: it locks the user's profile row (event order, see events).
        charge = credits.debit(session, user_id, spec.credits, max_active=max_active,
                               retry_after=_wait_hint(spec), queued_family=family if count else None)
        job = new_job(prompt, project)
        asset = _link(job, spec, _attach_asset(session, job, spec, req))  # first: the job references it
        session.execute(insert(Job.__table__), _values(job))
        credits.record(session, user_id=user_id, job_id=job_id, delta=-spec.credits,
                       reason="job_charge", balance_after=charge.balance, charge_no=1)
        events.write(session, events.job_event(job, "queued"), events.asset_event(asset, job_id))
        # The count ran before this job's row existed: it is last in its queue.
        submitted = Submitted(job=job, spec=spec, balance=charge.balance,
                              queue_length=lengths.next(family, charge.queued if count else None))
        if key is not None and answer is not None:
            status, body = answer(submitted)
            try:
                idempotency.store(session, key, status, body, job_id)
            except IntegrityError as e:
                raise DuplicateKey("A request with this Idempotency-Key was just accepted") from e
            submitted = replace(submitted, answer=StoredAnswer(status, body))
    metrics.job_created(spec.name)  # committed: the one place a submission is counted
    return submitted


def _link(job: Job, spec: JobType, asset: Image | Video) -> Image | Video:
    """The job's reference to its image or video row."""
    if spec.is_video:
        job.video_id = asset.id
    else:
        job.image_id = asset.id
    return asset


def _submit_in_one_statement(db: Database, spec: JobType, job: Job, max_active: int,
                             count: bool) -> tuple[int, int | None] | None:
    """PostgreSQL, a job with nothing to look up first (no project, no pre-created
    image/video, no Idempotency-Key): the whole submission as one statement run outside a
    transaction, so it is its own transaction and one round trip (:data:`_ONE_STATEMENT`).
    It writes the rows the transaction in :func:`submit_job` writes, passed as one JSON
    document. The new balance and, with ``count``, the family's jobs waiting before this
    one; None when nothing was written (no profile yet, too few credits, at
    ``max_active``)."""
    asset = _link(job, spec, _new_asset(job, spec))
    # The rows as the event log stores them (records.*_row: every column, JSON-safe) are
    # also what the statement inserts: each is in the document once.
    job_event = events.job_event_values(job, "queued")
    asset_event = events.asset_event_values(asset, job.id)
    doc = {"job": job_event.pop("payload"), "asset": asset_event.pop("payload"),
           "ledger": {"user_id": job.user_id, "job_id": job.id, "delta": -spec.credits,
                      "reason": "job_charge", "charge_no": 1, "created_at": iso(job.created_at)},
           "events": [{**e, "created_at": iso(e["created_at"])} for e in (job_event, asset_event)]}
    # The driver's own placeholders: nothing for SQLAlchemy to compile, cache or convert.
    row = db.first(_ONE_STATEMENT[spec.is_video, count], {
        "user": job.user_id, "amount": spec.credits, "now": job.created_at,
        "cap": max_active, **({"family": job.family} if count else {}),
        "doc": json.dumps(doc, separators=(",", ":"))})
    # The count ran before this job's row existed: it is last in its queue.
    return None if row is None else (row[0], row[1] if count else None)


def _one_statement_sql(assets: str, count: bool) -> str:
    """The submission as one ``WITH`` statement (psycopg's placeholders) over the JSON
    document ``%(doc)s``:

    1. ``charged``: the debit, ``UPDATE profiles … RETURNING``, only when the balance
       covers the price and the user has fewer than ``%(cap)s`` jobs queued or processing
       (0: no cap). It locks the user's profile row and queues its NOTIFY while the user
       is watched, as :mod:`orchestrator.events` asks of a transaction that appends events;
    2. the image/video row, the job, the ledger entry (with the new balance) and the
       events (job, then asset, each with its entity's row as payload), each inserted
       ``FROM charged``: written only when the debit was, and the events' ids are drawn
       after the lock, in the document's order;
    3. the answer: the new balance and, with ``count``, the family's queued jobs (this one
       not yet counted).

    Rows come from ``jsonb_populate_record(NULL::table, …)`` (JSON null is SQL NULL; text to
    the column's type as PostgreSQL's own input does). Foreign keys are checked at the end
    of the statement, so the job may reference the asset inserted beside it. Short enough
    for psycopg's query cache (tests/test_round_trips.py checks)."""
    ledger = [c for c in CreditEntry.__table__.c.keys() if c != "id"]  # id: its sequence
    from_ledger = ", ".join("charged.token_balance" if c == "balance_after" else f"r.{c}" for c in ledger)
    active = ", ".join(f"'{s}'" for s in credits.ACTIVE)
    # An event's payload is its entity's row, the one inserted beside it.
    event_values = [f"CASE r.entity WHEN 'job' THEN d.doc -> 'job' ELSE d.doc -> 'asset' END"
                    if c == "payload" else f"r.{c}" for c in events.EVENT_COLUMNS]
    queued = (f"(SELECT count(*) FROM jobs WHERE family = %(family)s AND status = "
              f"'{JobStatus.QUEUED.value}')" if count else "0")
    return f"""WITH d AS (SELECT CAST(%(doc)s AS jsonb) AS doc),
charged AS (UPDATE profiles SET token_balance = token_balance - %(amount)s, updated_at = %(now)s
  WHERE id = %(user)s AND token_balance >= %(amount)s AND (%(cap)s = 0 OR (SELECT count(*)
  FROM jobs WHERE user_id = %(user)s AND status IN ({active})) < %(cap)s)
  RETURNING token_balance, {events.NOTIFY_IF_WATCHED_SQL}),
a AS (INSERT INTO {assets} SELECT r.* FROM charged, d,
  jsonb_populate_record(NULL::{assets}, d.doc -> 'asset') r),
j AS (INSERT INTO jobs SELECT r.* FROM charged, d, jsonb_populate_record(NULL::jobs, d.doc -> 'job') r),
l AS (INSERT INTO credit_ledger ({", ".join(ledger)}) SELECT {from_ledger}
  FROM charged, d, jsonb_populate_record(NULL::credit_ledger, d.doc -> 'ledger') r),
e AS (INSERT INTO job_events ({", ".join(events.EVENT_COLUMNS)})
  SELECT {", ".join(event_values)} FROM charged, d, jsonb_populate_recordset(
  NULL::job_events, d.doc -> 'events') WITH ORDINALITY r ORDER BY r.ordinality)
SELECT token_balance AS balance, {queued} AS queued FROM charged"""


#: By (``is_video``, ``count``): the statement writing a video row or an image row, with or
#: without counting the family's queue.
_ONE_STATEMENT = {(video, count): _one_statement_sql("videos" if video else "images", count)
                  for video in (False, True) for count in (False, True)}


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
