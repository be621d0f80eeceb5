"""The job event log: one numbered row per change of a job, image or video.

Events are appended in the same transaction as the change they describe, so
the log never says something the tables do not (and vice versa).

Per user, event ids follow commit order, so a reader resuming "after id N"
never skips an event that committed late: on PostgreSQL every transaction
that appends a user's events first locks that user's profile row (writers of
one user's events take turns; ids are drawn after the lock), and the same
statement queues a ``NOTIFY`` delivered at commit (push, and nothing announced
that did not commit) while someone watches the user (:func:`watch`). SQLite
has a single writer at a time, so there the order holds anyway; with
``REDIS_URL`` the users are announced on Redis after commit (see
:func:`set_publisher`), and otherwise readers poll.

Why only while watched: PostgreSQL serialises notifying commits on one lock held
through each commit's WAL flush (so that notifications queue in commit order), so
commits that all NOTIFY cannot share a flush, and each one wakes every listening
server process. Eight connections committing one-row INSERTs on this project's
machine: 9,300/s, and 4,500-5,300/s with a ``pg_notify`` in each. (At the bench's
~550 submissions/s the difference was below its noise: bench/RESULTS.md.)
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable

from sqlalchemy import bindparam, event, literal_column, select, text
from sqlalchemy.orm import Session

from orchestrator.models import Image, Job, JobEvent, Video, utcnow
from orchestrator.records import image_row, iso, job_row, video_row

log = logging.getLogger(__name__)

#: The PostgreSQL NOTIFY channel and Redis pub/sub channel of new events (payload: user id).
CHANNEL = "orchestrator_events"
#: SQL of a column over ``profiles``: the row's user announced only while watched (NULL
#: otherwise). In a statement that locks the row: if another transaction changed the row
#: meanwhile, PostgreSQL evaluates it again on the latest version once locked (READ
#: COMMITTED; an evaluation on the older version can only add a harmless NOTIFY, never
#: miss one: leases only grow). See :func:`watch`.
NOTIFY_IF_WATCHED_SQL = (f"CASE WHEN profiles.watched_until > now() THEN "
                         f"pg_notify('{CHANNEL}', profiles.id::text) END")
_LOCK_AND_NOTIFY = text(f"SELECT {NOTIFY_IF_WATCHED_SQL} FROM profiles WHERE id = :user_id "
                        "FOR UPDATE")
_WATCH = text("UPDATE profiles SET watched_until = GREATEST(watched_until, "
              "now() + make_interval(secs => :seconds)) WHERE id = :user_id")
_publisher: Callable[[set[str]], None] | None = None


def job_event(job: Job, kind: str | None = None) -> JobEvent:
    """An event carrying the job's full new row; ``kind`` defaults to its status."""
    return JobEvent(**job_event_values(job, kind))


def job_event_values(job: Job, kind: str | None = None) -> dict[str, Any]:
    """:func:`job_event`'s columns (``EVENT_COLUMNS``), for a statement that inserts them."""
    return {"user_id": job.user_id, "job_id": job.id, "entity": "job", "entity_id": job.id,
            "type": f"job.{kind or job.status}", "payload": job_row(job), "created_at": utcnow()}


def asset_event(asset: Image | Video, job_id: str | None) -> JobEvent:
    return JobEvent(**asset_event_values(asset, job_id))


def asset_event_values(asset: Image | Video, job_id: str | None) -> dict[str, Any]:
    """:func:`asset_event`'s columns."""
    entity = "image" if isinstance(asset, Image) else "video"
    payload = image_row(asset) if isinstance(asset, Image) else video_row(asset)
    return {"user_id": asset.user_id, "job_id": job_id, "entity": entity, "entity_id": asset.id,
            "type": f"{entity}.{asset.status}", "payload": payload, "created_at": utcnow()}


def _lock_users(session: Session, events: tuple[JobEvent, ...]) -> None:
    """PostgreSQL: lock (and NOTIFY) each user not yet locked by this transaction."""
    users = {e.user_id for e in events}
    announced: set[str] = session.info.setdefault("event_users", set())
    if session.get_bind().dialect.name == "postgresql":
        for user_id in sorted(users - announced):  # sorted: two users' locks in one order
            session.execute(_LOCK_AND_NOTIFY, {"user_id": user_id})
    announced |= users


def append(session: Session, *events: JobEvent) -> None:
    """Add the events to the session (inserted at its next flush)."""
    _lock_users(session, events)
    session.add_all(events)


def announce_in(session: Session, user_id: str) -> Any | None:
    """For a statement that already locks the user's profile row (the charge's UPDATE):
    a column that queues the user's NOTIFY, so :func:`append` needs no statement of its
    own. None off PostgreSQL. Call only in a transaction that appends events."""
    if session.get_bind().dialect.name != "postgresql":
        return None
    session.info.setdefault("event_users", set()).add(user_id)
    return NOTIFY_USER


#: A column of a statement over ``profiles`` that NOTIFYs the row's user while watched
#: (see announce_in and watch).
NOTIFY_USER = literal_column(NOTIFY_IF_WATCHED_SQL)


def watch(session: Session, user_id: str, seconds: float) -> None:
    """PostgreSQL: have writers NOTIFY ``user_id``'s new events for at least ``seconds``
    more (a lease; a stream renews it while it lives). The profile must exist
    (:func:`orchestrator.queries.watch_events` creates it first).

    Race-free with the writers by the profile row's lock: the lease is an UPDATE of that
    row, and every writer's NOTIFY is a column of a statement that locks it, evaluated on
    the row's latest version. A writer that locked the row first commits before this
    UPDATE can, so a read made after this commit sees its events; a writer that locks it
    after sees the lease and NOTIFYs. Commit, then read the log."""
    session.execute(_WATCH, {"user_id": user_id, "seconds": seconds})


def set_publisher(publish: Callable[[set[str]], None] | None) -> None:
    """Announce users with new events after each commit (Redis pub/sub on SQLite)."""
    global _publisher
    _publisher = publish


def configure_push(database_url: str, redis_url: str | None) -> None:
    """Each writing process calls this once: on SQLite with Redis, announce on Redis.
    (PostgreSQL announces inside the transaction; without either, readers poll.)"""
    if redis_url and not database_url.startswith("postgresql"):
        import redis

        client = redis.Redis.from_url(redis_url, socket_connect_timeout=1, socket_timeout=1)

        def publish(users: set[str]) -> None:
            for user_id in users:
                client.publish(CHANNEL, user_id)

        set_publisher(publish)


@event.listens_for(Session, "after_commit")
def _announce(session: Session) -> None:
    users = session.info.pop("event_users", None)
    if users and _publisher is not None and session.get_bind().dialect.name != "postgresql":
        try:
            _publisher(users)
        except Exception as e:  # noqa: BLE001 - readers also poll now and then; never fail a commit
            log.warning("event announcement failed (%s)", type(e).__name__)


@event.listens_for(Session, "after_rollback")
def _forget(session: Session) -> None:
    session.info.pop("event_users", None)


def since(session: Session, user_id: str, after: int, *, job_id: str | None = None,
          limit: int = 500) -> list[JobEvent]:
    """The user's events (or one job's) with id > ``after``, oldest first."""
    stmt = select(JobEvent).where(JobEvent.user_id == user_id, JobEvent.id > after)
    if job_id is not None:
        stmt = stmt.where(JobEvent.job_id == job_id)
    return list(session.execute(stmt.order_by(JobEvent.id).limit(limit)).scalars())


def wire(e: JobEvent) -> dict[str, Any]:
    """An event as streams and the CLI show it."""
    return {"id": e.id, "type": e.type, "entity": e.entity, "entity_id": e.entity_id,
            "job_id": e.job_id, "payload": e.payload,
            "created_at": iso(e.created_at)}


def payloads(session: Session, job_id: str) -> list[dict[str, Any]]:
    """A job's events in order (for the CLI and tests)."""
    rows = session.query(JobEvent).filter(JobEvent.job_id == job_id).order_by(JobEvent.id)
    return [{"id": e.id, "type": e.type, "entity": e.entity, "payload": e.payload} for e in rows]


EVENT_COLUMNS = ("user_id", "job_id", "entity", "entity_id", "type", "payload", "created_at")


@functools.cache
def _insert_values(rows: int) -> Any:
    # Plain SQL text: a multi-row insert() construct is compiled again at every execution;
    # a text() statement is compiled once and cached like any other.
    table = JobEvent.__table__
    values = ", ".join("(" + ", ".join(f":e{i}_{c}" for c in EVENT_COLUMNS) + ")"
                       for i in range(rows))
    return text(f"INSERT INTO {table.name} ({', '.join(EVENT_COLUMNS)}) VALUES {values}").bindparams(
        *(bindparam(f"e{i}_{c}", type_=table.c[c].type) for i in range(rows) for c in EVENT_COLUMNS))


def write(session: Session, *events: JobEvent) -> None:
    """Insert the events now (no ORM flush), for transactions that write everything else
    with Core too: one multi-row ``INSERT … VALUES`` built once per row count, which for a
    few rows costs less than an executemany (psycopg runs one in pipeline mode)."""
    _lock_users(session, events)
    params = {f"e{i}_{c}": getattr(e, c) for i, e in enumerate(events) for c in EVENT_COLUMNS}
    session.execute(_insert_values(len(events)), params)
