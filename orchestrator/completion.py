"""Every change of a job after submission, as guarded compare-and-set updates.

Two doors lead here: Celery signals (in-house workers) and the HTTP callback
(external workers). Each function is one transaction that starts with a CAS
``UPDATE jobs … WHERE id = :id AND status IN (…) [AND attempts = :attempt]
RETURNING *``; when the guard is closed (a duplicate delivery, a late
callback, a stale attempt) nothing changes and the current row is returned.
The transaction that wins a terminal transition is the only one that touches
the asset row and the only one that refunds, so each happens once.

The statements are SQLAlchemy Core over the tables, built once per shape with
their values bound at execution (no ORM unit of work, no expression building or
cache-key generation per call). On PostgreSQL a transition is one statement
(:func:`_one_statement`): the CAS ``UPDATE … RETURNING``, the image/video row's
``UPDATE`` computed from the new job row, the lock of the owner's profile row (and
its NOTIFY while the owner is watched) that :mod:`orchestrator.events` requires,
and the events with their payloads built by the database; outside a transaction
it is its own, one round trip (a failure's refund joins it in a transaction).
SQLite runs the CAS, the asset's UPDATE and the events' INSERT as statements of
one transaction. Rows come back as detached :class:`Job` instances.
"""
from __future__ import annotations

import datetime as dt
import functools
import json
from dataclasses import dataclass, field
from typing import Any, Iterable

from sqlalchemy import (Float, String, and_, bindparam, case, cast, func, insert, literal,
                        literal_column, null, or_, select, true, union_all, update)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session, configure_mappers
from sqlalchemy.orm.base import manager_of_class

from orchestrator import credits, events, metrics
from orchestrator.db import Database
from orchestrator.errors import Conflict, NotFound
from orchestrator.jobtypes import JOB_TYPES, LONGEST_HARD_TIME_LIMIT
from orchestrator.models import Image, Job, JobEvent, Profile, UTCDateTime, Video, utcnow
from orchestrator.queries import canonical_uuid
from orchestrator.records import IMAGE_COLUMNS, JOB_COLUMNS, VIDEO_COLUMNS
from orchestrator.status import ASSET_STATUS_FOR, JobStatus, sources_of

TITLE_CHARS = 60
ERROR_CHARS = 2000

#: The tables; guards passed to these functions are expressions over ``JOBS.c``.
JOBS = Job.__table__
_IMAGES = Image.__table__
_VIDEOS = Video.__table__
_PROFILES = Profile.__table__
_EVENTS = JobEvent.__table__
_QUEUED, _PROCESSING = JobStatus.QUEUED.value, JobStatus.PROCESSING.value


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


# --- rows as detached instances ------------------------------------------------------------
def _loader(cls: type, table: Any) -> Any:
    """Row → instance, filled like a loaded one (no constructor, no change tracking). The
    mappers must be configured first: reading an attribute needs its instrumentation."""
    configure_mappers()
    manager = manager_of_class(cls)
    attrs = tuple(cls.__mapper__.get_property_by_column(c).key for c in table.c)  # type: ignore[attr-defined]
    # SQLite's RETURNING gives a whole-number REAL as an int (a SELECT gives a float).
    floats = [i for i, c in enumerate(table.c) if isinstance(c.type, Float)]

    def load(row: Any) -> Any:
        obj = manager.new_instance()
        if floats:
            row = list(row)
            for i in floats:
                if isinstance(row[i], int):
                    row[i] = float(row[i])
        obj.__dict__.update(zip(attrs, row))
        return obj

    return load


_job_of = _loader(Job, JOBS)


def _payload_loader(cls: type, table: Any) -> Any:
    """A row's ``records.*_row`` (an event payload) → a detached instance."""
    manager = manager_of_class(cls)
    attrs = tuple((c.name, cls.__mapper__.get_property_by_column(c).key,  # type: ignore[attr-defined]
                   isinstance(c.type, UTCDateTime)) for c in table.c)

    def load(row: dict[str, Any]) -> Any:
        obj = manager.new_instance()
        obj.__dict__.update(
            (attr, dt.datetime.fromisoformat(row[name]) if stamp and row[name] is not None
             else row[name]) for name, attr, stamp in attrs)
        return obj

    return load


_job_of_payload = _payload_loader(Job, JOBS)
if {c.name for c in JOBS.c} != set(JOB_COLUMNS):  # the job is read back from its payload
    raise RuntimeError("orchestrator.records.JOB_COLUMNS must list every column of jobs")
_image_of = _loader(Image, _IMAGES)
_video_of = _loader(Video, _VIDEOS)


def _b(name: str, column: Any) -> Any:
    """A bound value of ``column``'s type, named ``b_<name>``."""
    return bindparam(f"b_{name}", type_=column.type)


def _status_is(*statuses: str) -> Any:
    c = JOBS.c.status
    return c == statuses[0] if len(statuses) == 1 else or_(*(c == s for s in statuses))


def _job_update(where: Iterable[Any], fenced: bool, values: dict[str, Any]) -> Any:
    """``UPDATE jobs SET … WHERE id = :b_id AND … [AND attempts = :b_attempt]`` (a CAS;
    :func:`_run` adds ``RETURNING *``, :func:`_one_statement` what it needs)."""
    conditions = [JOBS.c.id == _b("id", JOBS.c.id), *where]
    if fenced:
        conditions.append(JOBS.c.attempts == _b("attempt", JOBS.c.attempts))
    return update(JOBS).where(*conditions).values(
        updated_at=_b("now", JOBS.c.updated_at), **{k: _constant(v) for k, v in values.items()})


_STATUSES = frozenset(s.value for s in JobStatus)


def _constant(value: Any) -> Any:
    """NULL, a number or a status written into the statement's text (not a parameter);
    anything else unchanged (bound)."""
    if value is None:
        return null()
    if isinstance(value, int) and not isinstance(value, bool):
        return literal_column(str(int(value)))
    if isinstance(value, str) and value in _STATUSES:
        return literal_column(f"'{value}'")
    return value


@functools.lru_cache(maxsize=256)
def _returning_row(stmt: Any) -> Any:
    return stmt.returning(*JOBS.c)


def _run(executor: Any, stmt: Any, params: dict[str, Any]) -> Job | None:
    """Run a CAS; the row it wrote, or None."""
    row = executor.execute(_returning_row(stmt), params).first()
    return None if row is None else _job_of(row)


@functools.cache
def _select_job() -> Any:
    return select(*JOBS.c).where(JOBS.c.id == _b("id", JOBS.c.id))


def _current(session: Session, job_id: str) -> Job | None:
    row = session.execute(_select_job(), {"b_id": job_id}).first()
    return None if row is None else _job_of(row)


def _load(session: Session, job_id: str) -> Job:
    job = _current(session, job_id)
    if job is None:
        raise NotFound("Job not found")
    return job


def _one_off(job_id: str, sources: tuple[str, ...], attempt: int | None, *guards: Any,
             **values: Any) -> tuple[Any, dict[str, Any]]:
    """A CAS built per call (the less travelled transitions) and its parameters."""
    stmt = _job_update((_status_is(*sources), *guards), attempt is not None, values)
    params: dict[str, Any] = {"b_id": job_id, "b_now": utcnow()}
    if attempt is not None:
        params["b_attempt"] = attempt
    return stmt, params


# --- JSON merged by the database -----------------------------------------------------------
def _dialect(executor: Any) -> str:
    """The dialect of a Connection or a Session."""
    bound = getattr(executor, "dialect", None)
    return (bound or executor.get_bind().dialect).name


def _merge(dialect: str, column: Any, keys: tuple[str, ...], prefix: str) -> Any:
    """``column`` with top-level ``keys`` set (``dict.update``), values bound at execution
    (see :func:`_merge_params`)."""
    if dialect == "postgresql":
        return func.coalesce(column, cast(literal_column("'{}'"), JSONB)).op("||", return_type=JSONB)(
            bindparam(f"{prefix}patch", type_=JSONB))
    args: list[Any] = [func.coalesce(column, literal("{}"))]
    for i, key in enumerate(keys):
        args += [literal('$."' + key.replace('"', '""') + '"'),
                 func.json(bindparam(f"{prefix}{i}", type_=String))]
    return func.json_set(*args)


def _merge_params(dialect: str, patch: dict[str, Any], prefix: str) -> dict[str, Any]:
    if dialect == "postgresql":
        return {f"{prefix}patch": patch}
    return {f"{prefix}{i}": json.dumps(v) for i, v in enumerate(patch.values())}


def _with_bucket(dialect: str) -> Any:
    """The job's ``result`` with ``bucket`` set to its job type (the bound JSON has the key)."""
    if dialect == "postgresql":
        return func.jsonb_set(bindparam("b_result", type_=JSONB), literal_column("'{bucket}'"),
                              func.to_jsonb(JOBS.c.job_type))
    return func.json_set(bindparam("b_result", type_=String), literal("$.bucket"), JOBS.c.job_type)


# --- the asset row -------------------------------------------------------------------------
@functools.cache
def _asset_update(dialect: str, video: bool, names: tuple[str, ...], patch: tuple[str, ...]) -> Any:
    table = _VIDEOS if video else _IMAGES
    values = {n: _b(n, table.c[n]) for n in names}
    if patch:
        values["metadata"] = _merge(dialect, table.c["metadata"], patch, "m_")
    return (update(table).where(table.c.id == _b("id", table.c.id)).values(values)
            .returning(*table.c))


def _sync_asset(session: Session, job: Job, outcome: Outcome | None = None,
                now: dt.datetime | None = None) -> Image | Video | None:
    """Mirror the job's status onto its image/video row (CONTRACT §5): one
    ``UPDATE … RETURNING``; the row it wrote, or None when the job has none."""
    video = job.video_id is not None
    asset_id = job.video_id or job.image_id
    if asset_id is None:
        return None
    status = JobStatus(job.status)
    values: dict[str, Any] = {"status": ASSET_STATUS_FOR[status].value, "updated_at": now or utcnow()}
    if job.enhanced_prompt:
        values["enhanced_prompt"] = job.enhanced_prompt
    patch: dict[str, Any] = {}
    if status is JobStatus.COMPLETED and outcome is not None:
        first = outcome.assets[0]
        values["title"] = job.prompt[:TITLE_CHARS]
        values["completed_at"] = values["updated_at"]
        if video:
            values["video_url"] = first
            values["thumbnail_url"] = outcome.thumbnail
        else:
            values["image_url"] = first
            values["image_urls"] = list(outcome.assets) if len(outcome.assets) > 1 else None
            values["thumbnail_url"] = outcome.thumbnail or first
        patch = {k: v for k, v in outcome.metadata.items() if k in ("seeds", "generator")}
    elif status.is_terminal:
        patch = {"error": job.error_message}
    dialect = _dialect(session)
    stmt = _asset_update(dialect, video, tuple(values), tuple(patch))
    params = {f"b_{k}": v for k, v in values.items()}
    params["b_id"] = asset_id
    if patch:
        params.update(_merge_params(dialect, patch, "m_"))
    row = session.execute(stmt, params).first()
    if row is None:
        return None
    return _video_of(row) if video else _image_of(row)


def _emit(session: Session, job: Job, asset: Image | Video | None, kind: str | None = None) -> None:
    evs = [events.job_event(job, kind)]
    if asset is not None:
        evs.append(events.asset_event(asset, job.id))
    events.write(session, *evs)


# --- PostgreSQL: a transition in one statement ---------------------------------------------
#: records.iso in SQL: UTC, ISO 8601 with a ``Z``, microseconds unless they are zero (as
#: ``datetime.isoformat`` writes them).
_ISO = """replace(to_char(timezone('UTC', v), 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'), '.000000Z', 'Z')"""


def _payload(row: str, table: Any, columns: tuple[str, ...]) -> Any:
    """``records.*_row`` of ``row`` (a table or CTE of the statement), built by the
    database: ``to_jsonb`` of the row, its timestamps spelled as :func:`records.iso` does,
    its floats as Python's ``json`` (a whole number keeps its ``.0``); the same JSON value
    as the Python function (the tests compare them)."""
    sql = f"to_jsonb({row})"
    extra = [c.name for c in table.c if c.name not in columns]
    if extra:
        sql += " - ARRAY[" + ", ".join(f"'{name}'" for name in extra) + "]"
    stamps = [c.name for c in table.c if c.name in columns and isinstance(c.type, UTCDateTime)]
    if stamps:
        pairs = ", ".join(f"('{name}', {row}.{name})" for name in stamps)
        sql += f" || (SELECT jsonb_object_agg(k, {_ISO}) FROM (VALUES {pairs}) AS s (k, v))"
    for name in (c.name for c in table.c if c.name in columns and isinstance(c.type, Float)):
        value = f"{row}.{name}"
        sql += (f" || jsonb_build_object('{name}', CASE WHEN {value} = trunc({value}) AND "
                f"abs({value}) < 1e15 THEN CAST(CAST(CAST({value} AS BIGINT) AS TEXT) || '.0' "
                f"AS JSONB) ELSE to_jsonb({value}) END)")
    return literal_column(sql, type_=JSONB).label("payload")


def _asset_sets(cas: Any, table: Any, video: bool, status: JobStatus, completed: bool,
                patch: bool) -> dict[str, Any]:
    """:func:`_sync_asset`'s values as expressions over the CAS's new row (``cas``)."""
    values: dict[str, Any] = {
        "status": literal_column(f"'{ASSET_STATUS_FOR[status].value}'"),
        "updated_at": cas.c.updated_at,
        # Python's ``if job.enhanced_prompt:``: only a non-empty one replaces the asset's.
        "enhanced_prompt": func.coalesce(func.nullif(cas.c.enhanced_prompt, literal_column("''")),
                                         table.c.enhanced_prompt)}
    merge: Any = None
    if completed:
        values["title"] = func.substr(cas.c.prompt, 1, literal_column(str(TITLE_CHARS)))
        values["completed_at"] = cas.c.updated_at
        if video:
            values["video_url"] = bindparam("a_first", type_=table.c.video_url.type)
            values["thumbnail_url"] = bindparam("a_thumb", type_=table.c.thumbnail_url.type)
        else:
            values["image_url"] = bindparam("a_first", type_=table.c.image_url.type)
            values["image_urls"] = bindparam("a_urls", type_=table.c.image_urls.type)
            values["thumbnail_url"] = bindparam("a_image_thumb", type_=table.c.thumbnail_url.type)
        if patch:
            merge = bindparam("a_patch", type_=JSONB)
    elif status.is_terminal:
        merge = func.jsonb_build_object(literal_column("'error'"), cas.c.error_message)
    if merge is not None:
        values["metadata"] = func.coalesce(table.c["metadata"], cast(literal_column("'{}'"), JSONB)).op(
            "||", return_type=JSONB)(merge)
    return values


#: What the statement reads of the new job row besides its payload.
_CAS_COLUMNS = ("id", "user_id", "image_id", "video_id", "prompt", "enhanced_prompt",
                "error_message", "updated_at")


@functools.lru_cache(maxsize=256)
def _one_statement(stmt: Any, status: JobStatus, completed: bool, patch: bool, kind: str | None,
                   asset: bool) -> Any:
    """PostgreSQL: a whole transition as one statement, so it is one round trip (and, run
    outside a transaction, its own transaction):

    1. ``cas``: the CAS ``UPDATE jobs … RETURNING *`` (``stmt``);
    2. ``image``/``video`` (``asset``): :func:`_sync_asset` as an ``UPDATE … RETURNING``
       computed from the new job row;
    3. ``owner``: the lock of the owner's profile row and its NOTIFY while the owner is
       watched (what :mod:`orchestrator.events` requires of a transaction that appends
       events);
    4. ``ev``: the events (job, then asset: :func:`orchestrator.events.job_event` and
       ``asset_event``, payloads built by the database, :func:`_row_json`), inserted from
       rows that join ``owner``: their ids are drawn after the lock.

    Returns the new job row; no row when the guard was closed (nothing written)."""
    cas = stmt.returning(*(JOBS.c[n] for n in _CAS_COLUMNS),
                         _payload("jobs", JOBS, JOB_COLUMNS)).cte("cas")
    # (Short names: the longest shape stays within psycopg's 4 KiB query cache, a test says.)
    owner = (select(_PROFILES.c.id, events.NOTIFY_USER.label("n"))
             .where(_PROFILES.c.id == cas.c.user_id).with_for_update(of=_PROFILES).cte("owner"))
    now = cas.c.updated_at  # the transition's time
    rows = [select(cas.c.user_id, cas.c.id, literal_column("'job'"), cas.c.id,
                   literal_column(f"'job.{kind or status.value}'"), cas.c.payload, now)
            .select_from(cas.join(owner, owner.c.id == cas.c.user_id))]
    if asset:
        image = (update(_IMAGES).where(_IMAGES.c.id == cas.c.image_id, cas.c.video_id.is_(None))
                 .values(_asset_sets(cas, _IMAGES, False, status, completed, patch))
                 .returning(_IMAGES.c.id, _IMAGES.c.user_id, _IMAGES.c.status,
                            _payload("images", _IMAGES, IMAGE_COLUMNS)).cte("image"))
        video = (update(_VIDEOS).where(_VIDEOS.c.id == cas.c.video_id)
                 .values(_asset_sets(cas, _VIDEOS, True, status, completed, patch))
                 .returning(_VIDEOS.c.id, _VIDEOS.c.user_id, _VIDEOS.c.status,
                            _payload("videos", _VIDEOS, VIDEO_COLUMNS)).cte("video"))
        for cte, entity in ((image, "image"), (video, "video")):
            rows.append(select(cte.c.user_id, cas.c.id, literal_column(f"'{entity}'"), cte.c.id,
                               literal_column(f"'{entity}.' || {entity}.status"), cte.c.payload, now)
                        .select_from(cte.join(cas, true()).join(owner, owner.c.id == cas.c.user_id)))
    appended = insert(_EVENTS).from_select(list(events.EVENT_COLUMNS), union_all(*rows)).cte("ev")
    return select(cas.c.payload).add_cte(appended)


def _statement_values(stmt: Any, params: dict[str, Any], status: JobStatus,
                      outcome: Outcome | None, kind: str | None,
                      asset: bool) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """PostgreSQL: the shape of a transition's one statement (:func:`_one_statement`'s
    arguments) and its values."""
    completed = status is JobStatus.COMPLETED and outcome is not None
    values = dict(params)
    patch: dict[str, Any] = {}
    if completed and asset:
        assert outcome is not None
        first = outcome.assets[0]
        values.update(a_first=first, a_thumb=outcome.thumbnail,
                      a_image_thumb=outcome.thumbnail or first,
                      a_urls=list(outcome.assets) if len(outcome.assets) > 1 else None)
        patch = {k: v for k, v in outcome.metadata.items() if k in ("seeds", "generator")}
        if patch:
            values["a_patch"] = patch
    return (stmt, status, completed, bool(patch), kind, asset), values


def _transition(executor: Any, stmt: Any, params: dict[str, Any], status: JobStatus, *,
                outcome: Outcome | None = None, kind: str | None = None,
                asset: bool = True) -> Job | None:
    """Run a CAS (``stmt``, moving the job to ``status``); when it wins, mirror the job onto
    its asset row (``asset``) and append the events (job, then asset), atomically. The job,
    or None when the guard was closed (nothing written).

    ``executor``: on PostgreSQL a connection (outside a transaction: the statement is its
    own) or a session in a transaction; on SQLite a session in a transaction."""
    if _dialect(executor) != "postgresql":
        job = _run(executor, stmt, params)
        if job is None:
            return None
        completed = status is JobStatus.COMPLETED and outcome is not None
        _emit(executor, job, _sync_asset(executor, job, outcome if completed else None,
                                         params["b_now"]) if asset else None, kind)
        return job
    shape, values = _statement_values(stmt, params, status, outcome, kind, asset)
    row = executor.execute(_one_statement(*shape), values).first()
    return None if row is None else _job_of_payload(row[0])


def _transition_alone(db: Database, stmt: Any, params: dict[str, Any], status: JobStatus, *,
                      outcome: Outcome | None = None, kind: str | None = None,
                      asset: bool = True) -> Job | None:
    """:func:`_transition` as its own transaction, for a ``stmt`` built once (cached: its
    statement is compiled once per process). On PostgreSQL one statement on the driver's
    cursor (:meth:`Database.first`), on SQLite a write transaction.

    Every transition commits durably (``synchronous_commit`` as the server has it, on by
    default), the claim included: its events are streamed to users as soon as they commit
    (``GET /v1/events``), and an event a database crash took back, whose id the sequence
    could then hand out again, would break the stream's promise (every event once, equal to
    the durable log). Measured: a claim without waiting for its WAL flush saved about
    0.2 ms per job; not taken for that reason."""
    if db.dialect != "postgresql":
        with db.transaction() as session:
            return _transition(session, stmt, params, status, outcome=outcome, kind=kind,
                               asset=asset)
    shape, values = _statement_values(stmt, params, status, outcome, kind, asset)
    prepared = db.prepared(("transition", *shape), lambda: _one_statement(*shape))
    row = db.first(prepared.sql, prepared.parameters(values))
    return None if row is None else _job_of_payload(row[0])


# --- transitions ---------------------------------------------------------------------------
@functools.cache
def _claim() -> Any:
    """``queued → processing`` (or a dead worker's expired lease), next attempt, a lease."""
    now = _b("now", JOBS.c.started_at)
    claimable = or_(JOBS.c.status == _QUEUED,
                    and_(JOBS.c.status == _PROCESSING, JOBS.c.lease_expires_at < now))
    return _job_update((claimable, JOBS.c.attempts < JOBS.c.max_attempts), False, dict(
        status=_PROCESSING, attempts=JOBS.c.attempts + 1, progress=0, started_at=now,
        lease_owner=_b("owner", JOBS.c.lease_owner), error_message=None,
        lease_expires_at=_b("lease", JOBS.c.lease_expires_at)))


def start_job(db: Database, job_id: str, *, worker: str, lease_seconds: int) -> Job | None:
    """Claim a job for a worker: ``queued → processing``, next attempt, a lease.

    A ``processing`` job whose lease has expired (its worker died) may be
    claimed too, so a redelivered message need not wait for the reconciler.
    Returns the claimed job, or None when the job is not claimable (running
    elsewhere, finished, cancelled) or out of attempts: do no work.
    """
    now = utcnow()
    job = _transition_alone(db, _claim(), {
        "b_id": job_id, "b_now": now, "b_owner": worker,
        "b_lease": now + dt.timedelta(seconds=lease_seconds)}, JobStatus.PROCESSING)
    if job is not None:
        metrics.job_started(job, now)  # committed, and this claim won
        return job
    with db.writer() as reader:
        current = _current(reader, job_id)
    if current is not None and current.attempts >= current.max_attempts and (
            current.status == _QUEUED
            or (current.status == _PROCESSING
                and current.lease_expires_at is not None and current.lease_expires_at < now)):
        # Out of attempts: end the job instead of looping on it.
        fail_exhausted(db, current)
    return None


def fail_exhausted(db: Database, job: Job, *, now: dt.datetime | None = None) -> Transition:
    """End a job whose every attempt was used (its workers kept dying)."""
    return finish_job(db, job.id, Outcome(
        JobStatus.FAILED, attempt=job.attempts,
        error=f"worker lost; all {job.max_attempts} attempts used"),
        guards=(or_(JOBS.c.status == _QUEUED, JOBS.c.lease_expires_at < (now or utcnow())),))


def _lease(by_type: bool) -> Any:
    """The new lease: ``:b_lease``, or (``by_type``, PostgreSQL) ``:b_now`` plus the hard time
    limit of the job's type, computed by the database (no read of the type first)."""
    if not by_type:
        return _b("lease", JOBS.c.lease_expires_at)
    # Constants in the text, not parameters: the job types are the registry's names.
    seconds = case({literal_column(f"'{name}'"): literal_column(str(int(spec.hard_time_limit)))
                    for name, spec in JOB_TYPES.items()},
                   value=JOBS.c.job_type, else_=literal_column(str(int(LONGEST_HARD_TIME_LIMIT))))
    return _b("now", JOBS.c.lease_expires_at) + seconds * literal_column("INTERVAL '1 second'")


@functools.cache
def _renewal(fenced: bool, by_type: bool = False) -> Any:
    return _job_update((JOBS.c.status == _PROCESSING,), fenced,
                       dict(lease_expires_at=_lease(by_type)))


def _renew(session: Session, job_id: str, attempt: int | None, lease: dt.datetime | None,
           now: dt.datetime, guards: tuple[Any, ...] = ()) -> Job | None:
    """``lease`` None: its type's hard time limit (PostgreSQL)."""
    if guards:
        return _run(session, *_one_off(job_id, (_PROCESSING,), attempt, *guards,
                                       lease_expires_at=lease))
    params: dict[str, Any] = {"b_id": job_id, "b_now": now}
    if lease is not None:
        params["b_lease"] = lease
    if attempt is not None:
        params["b_attempt"] = attempt
    return _run(session, _renewal(attempt is not None, lease is None), params)


def renew(db: Database, job_id: str, attempt: int | None, lease_seconds: int, *,
          guards: tuple[Any, ...] = ()) -> Job | None:
    """Extend a running job's lease; the job, or None when the run is not current.
    ``guards``: more conditions, over :data:`JOBS` columns."""
    now = utcnow()
    with db.writer() as writer:
        return _renew(writer, job_id, attempt, now + dt.timedelta(seconds=lease_seconds), now,
                      guards)


def renew_lease(db: Database, job_id: str, attempt: int, lease_seconds: int) -> bool:
    """Extend a running job's lease. False: the run is no longer current (stop)."""
    return renew(db, job_id, attempt, lease_seconds) is not None


def requeue_expired(db: Database, job_id: str, attempt: int, *,
                    now: dt.datetime | None = None) -> bool:
    """A dead worker's job, attempts left: ``processing → queued``, to be published again."""
    with db.transaction() as session:
        stmt, params = _one_off(
            job_id, (_PROCESSING,), attempt,
            JOBS.c.lease_expires_at < (now or utcnow()), JOBS.c.attempts < JOBS.c.max_attempts,
            status=_QUEUED, lease_owner=None, lease_expires_at=None, dispatched_at=None,
            progress=0, error_message=f"worker lost during attempt {attempt}; requeued")
        return _transition(session, stmt, params, JobStatus.QUEUED, kind="requeued") is not None


@functools.cache
def _report_claim(fenced: bool, by_type: bool = False) -> Any:
    """An external worker's first ``processing``: ``queued → processing``."""
    now = _b("now", JOBS.c.started_at)
    return _job_update((JOBS.c.status == _QUEUED, JOBS.c.attempts < JOBS.c.max_attempts), fenced,
                       dict(status=_PROCESSING, attempts=JOBS.c.attempts + 1, progress=0,
                            started_at=func.coalesce(JOBS.c.started_at, now),
                            lease_owner=_b("owner", JOBS.c.lease_owner),
                            lease_expires_at=_lease(by_type), error_message=None))


@functools.cache
def _job_type() -> Any:
    return select(JOBS.c.job_type).where(JOBS.c.id == _b("id", JOBS.c.id))


def report_processing(db: Database, job_id: str, *, worker: str, lease_seconds: int | None,
                      attempt: int | None = None, claim_first: bool = True) -> Transition:
    """An external worker says it is working: claim a queued job or renew the lease.

    ``lease_seconds`` None: the hard time limit of the job's type (on PostgreSQL computed in
    the same statement, so a report needs no read first). The two CAS exclude each other
    (queued vs processing); ``claim_first=False`` tries the renewal first, for a report
    that most likely renews (one statement fewer then).

    Raises:
        NotFound: no such job.
    """
    now = utcnow()
    with db.writer() as writer:
        by_type = lease_seconds is None and _dialect(writer) == "postgresql"
        if lease_seconds is None and not by_type:
            job_type = writer.execute(_job_type(), {"b_id": job_id}).scalar_one_or_none()
            if job_type is None:
                raise NotFound("Job not found")
            lease_seconds = JOB_TYPES[job_type].hard_time_limit
        lease = None if by_type else now + dt.timedelta(seconds=lease_seconds)  # type: ignore[arg-type]
        params: dict[str, Any] = {"b_id": job_id, "b_now": now, "b_owner": worker}
        if lease is not None:
            params["b_lease"] = lease
        if attempt is not None:
            params["b_attempt"] = attempt
        renewed = None if claim_first else _renew(writer, job_id, attempt, lease, now)
        if renewed is not None:
            return Transition(renewed, False)
        job = _transition(writer, _report_claim(attempt is not None, by_type), params,
                          JobStatus.PROCESSING)
        if job is not None:
            result = Transition(job, True)
        else:
            job = _renew(writer, job_id, attempt, lease, now) if claim_first else None
            result = Transition(job if job is not None else _load(writer, job_id), False)
    if result.changed:
        metrics.job_started(result.job, now)  # committed, and this claim won
    return result


@functools.cache
def _progress() -> Any:
    return _job_update((JOBS.c.status == _PROCESSING,), True, dict(
        progress=_b("progress", JOBS.c.progress),
        lease_expires_at=_b("lease", JOBS.c.lease_expires_at)))


def record_progress(db: Database, job_id: str, attempt: int, progress: int, *,
                    lease_seconds: int) -> bool:
    """Store progress (0–100) and renew the lease. False: the run was cancelled
    or superseded, and the worker should stop."""
    now = utcnow()
    return _transition_alone(db, _progress(), {
        "b_id": job_id, "b_attempt": attempt, "b_now": now,
        "b_progress": max(0, min(100, progress)),
        "b_lease": now + dt.timedelta(seconds=lease_seconds)},
        JobStatus.PROCESSING, kind="progress", asset=False) is not None


def record_enhancement(db: Database, job_id: str, attempt: int, *, prompt: str, backend: str,
                       error: str | None) -> bool:
    """Store the enhanced prompt (and why enhancement failed, if it did)."""
    with db.transaction() as session:
        dialect = _dialect(session)
        patch = {"enhancement": {"backend": backend, "error": error}}
        stmt = _job_update((JOBS.c.status == _PROCESSING,), True, dict(
            enhanced_prompt=_b("prompt", JOBS.c.enhanced_prompt),
            metadata=_merge(dialect, JOBS.c["metadata"], tuple(patch), "m_")))
        return _transition(session, stmt, {
            "b_id": job_id, "b_attempt": attempt, "b_now": utcnow(), "b_prompt": prompt,
            **_merge_params(dialect, patch, "m_")}, JobStatus.PROCESSING,
            kind="enhanced") is not None


_DONE_KEYS = ("primary_asset", "all_assets")


def _finish_statement(dialect: str, status: JobStatus, fenced: bool, enhanced: bool,
                      bucket_from_type: bool, guards: tuple[Any, ...]) -> Any:
    values: dict[str, Any] = dict(
        status=status.value, completed_at=_b("now", JOBS.c.completed_at), lease_owner=None,
        lease_expires_at=None)
    if status is JobStatus.COMPLETED:
        now = _b("now", JOBS.c.started_at)
        # An external worker may report completion without a processing
        # callback first: the run still happened, once.
        values["started_at"] = func.coalesce(JOBS.c.started_at, now)
        values["attempts"] = case((JOBS.c.attempts == literal_column("0"), literal_column("1")),
                                  else_=JOBS.c.attempts)
        values["progress"] = 100
        values["error_message"] = None
        values["result"] = (_with_bucket(dialect) if bucket_from_type
                            else _b("result", JOBS.c.result))
        values["metadata"] = _merge(dialect, JOBS.c["metadata"], _DONE_KEYS, "m_")
    else:
        values["error_message"] = _b("error", JOBS.c.error_message)
    if enhanced:
        values["enhanced_prompt"] = _b("enhanced", JOBS.c.enhanced_prompt)
    sources = tuple(s for s in sources_of(status) if s != JobStatus.FAILED.value)
    return _job_update((_status_is(*sources), *guards), fenced, values)


_finish_cached = functools.lru_cache(maxsize=None)(_finish_statement)


def finish_job(db: Database, job_id: str, outcome: Outcome, *, guards: tuple[Any, ...] = ()) -> Transition:
    """End a job: completed, failed or cancelled. Idempotent.

    A completion with no assets is a failure. Failed and cancelled jobs are
    refunded by the one transaction that ends them. ``guards``: more
    conditions, over :data:`JOBS` columns.
    """
    if outcome.status is JobStatus.COMPLETED and not outcome.assets:
        outcome = Outcome(JobStatus.FAILED, attempt=outcome.attempt,
                          error="worker reported completion without any assets",
                          enhanced_prompt=outcome.enhanced_prompt, metadata=outcome.metadata)
    status = outcome.status
    now = utcnow()
    params: dict[str, Any] = {"b_id": job_id, "b_now": now}
    if outcome.attempt is not None:
        params["b_attempt"] = outcome.attempt
    if outcome.enhanced_prompt:
        params["b_enhanced"] = outcome.enhanced_prompt
    bucket_from_type = "bucket" not in outcome.metadata
    completed = status is JobStatus.COMPLETED
    dialect = db.dialect
    if status is JobStatus.COMPLETED:
        result = {"bucket": None, "assets": list(outcome.assets),
                  "thumbnail": outcome.thumbnail, **outcome.metadata}
        params["b_result"] = json.dumps(result) if dialect != "postgresql" and bucket_from_type \
            else result
        params.update(_merge_params(dialect, {"primary_asset": outcome.assets[0],
                                              "all_assets": list(outcome.assets)}, "m_"))
    else:
        params["b_error"] = (outcome.error or status.value)[:ERROR_CHARS]
    shape = (dialect, status, outcome.attempt is not None, bool(outcome.enhanced_prompt),
             bucket_from_type)
    if completed and not guards:
        # A completion is one statement (on PostgreSQL its own transaction).
        job = _transition_alone(db, _finish_cached(*shape, ()), params, status, outcome=outcome)
        if job is None:
            with db.writer() as reader:
                return Transition(_load(reader, job_id), False)
    else:
        # A failure also refunds, in the same transaction.
        stmt = _finish_statement(*shape, guards) if guards else _finish_cached(*shape, ())
        with db.writer() if completed else db.transaction() as writer:
            job = _transition(writer, stmt, params, status, outcome=outcome)
            if job is None:
                return Transition(_load(writer, job_id), False)
            if not completed:
                credits.refund(writer, user_id=job.user_id, job_id=job.id, amount=job.credits,
                               charge_no=job.charges)
    # Committed, and only the transaction whose guard let it through gets here:
    # the one place a job's end is counted.
    metrics.job_finished(job)
    return Transition(job, True)


def release(db: Database, job_id: str) -> bool:
    """A worker gives a leased job back (``lpush``): ``processing → queued``."""
    with db.transaction() as session:
        stmt, params = _one_off(job_id, (_PROCESSING,), None, status=_QUEUED, lease_owner=None,
                                lease_expires_at=None, progress=0)
        return _transition(session, stmt, params, JobStatus.QUEUED, kind="released") is not None


def fail_timed_out(db: Database, job_id: str, *, host: str) -> Transition:
    """The worker host killed the job past its hard time limit: fail that run
    (guarded by the lease this host holds; a run elsewhere is not touched)."""
    return finish_job(db, job_id, Outcome(JobStatus.FAILED, error="generation timed out"),
                      guards=(JOBS.c.status == _PROCESSING,
                              JOBS.c.lease_owner.like(f"{host}:%")))


def requeue_for_retry(db: Database, job_id: str, attempt: int, reason: str) -> bool:
    """A transient error: ``processing → queued`` so the retried delivery can claim it.

    Called by the task before it publishes the retry, so the retried message
    can never arrive while the job still looks busy.
    """
    with db.transaction() as session:
        stmt, params = _one_off(job_id, (_PROCESSING,), attempt, status=_QUEUED, lease_owner=None,
                                lease_expires_at=None, error_message=reason[:ERROR_CHARS],
                                progress=0, dispatched_at=utcnow())
        return _transition(session, stmt, params, JobStatus.QUEUED, kind="retrying") is not None


@functools.cache
def _owner() -> Any:
    return select(JOBS.c.user_id).where(JOBS.c.id == _b("id", JOBS.c.id))


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
            owner = session.execute(_owner(), {"b_id": job_id}).scalar_one_or_none()
    if owner != user_id:
        raise NotFound("Job not found")
    result = finish_job(db, job_id, Outcome(JobStatus.CANCELLED, error="cancelled by user"))
    if not result.changed and result.job.status != JobStatus.CANCELLED.value:
        raise Conflict(f"Job already {result.job.status}", details={"status": result.job.status})
    return result.job


@functools.cache
def _dispatched() -> Any:
    return (update(JOBS).where(JOBS.c.id == _b("id", JOBS.c.id), JOBS.c.dispatched_at.is_(None))
            .values(dispatched_at=_b("now", JOBS.c.dispatched_at)))


def mark_dispatched(db: Database, job_id: str) -> None:
    """Note that the job's message reached the broker (the reconciler reads this)."""
    with db.writer() as writer:
        writer.execute(_dispatched(), {"b_id": job_id, "b_now": utcnow()})
