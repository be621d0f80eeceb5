"""Live job events over Server-Sent Events: ``GET /v1/events`` (the user's) and
``GET /v1/jobs/<id>/events`` (one job's; it ends after the job's terminal event).

Each durable event of the log (``orchestrator.events``) is sent once, in
order, with its id; a client resuming with ``Last-Event-ID`` (or ``?since=``)
gets everything after it, nothing twice. Queued jobs also get ``queue`` events
(no id: derived, not logged) with their position and ETA whenever these
change. ``: keepalive`` comments keep idle proxies from closing the stream.

Streams are woken, not polled, when the deployment can push: PostgreSQL's
``LISTEN`` (the writers' ``NOTIFY`` arrives at commit; writers send it only
while the user is watched, a lease each stream takes before its first read and
renews while it lives: :func:`orchestrator.events.watch`), or Redis pub/sub on
SQLite with ``REDIS_URL``; the embedded default re-reads the log every
``POLL_S``. One listener thread per web process fans notifications out to
that process's streams. Each open stream holds one gunicorn thread, so a
process serves at most ``SSE_MAX_STREAMS`` (then 503 + Retry-After); size
``WEB_THREADS`` above it (README).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import weakref
from typing import Any, Callable, Iterator

from flask import (Blueprint, Flask, Response, current_app, g, jsonify, request,
                   stream_with_context)
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from orchestrator import events, queries, queues
from orchestrator.errors import InvalidRequest, ServiceUnavailable
from orchestrator.models import Job
from orchestrator.status import JobStatus
from web.auth import user_required
from web.openapi import Reply, spec
from web.schemas import EventsQuery, JobId, LastEventId, QueuesAnswer
from web.services import services

log = logging.getLogger(__name__)

bp = Blueprint("live", __name__, url_prefix="/v1")

#: Re-read period without push (embedded default), and while a push listener is down.
POLL_S = 0.5
#: How often positions of queued jobs are recomputed (other users' jobs move them).
QUEUE_TICK_S = 1.0
TERMINAL = {f"job.{s.value}" for s in JobStatus if s.is_terminal}
#: Set when the process is shutting down: every stream ends (clients resume elsewhere).
_closing = threading.Event()
_hubs: "weakref.WeakSet[Hub]" = weakref.WeakSet()


def close_streams() -> None:
    """End every event stream of this process now (called on SIGTERM by gunicorn_conf)."""
    _closing.set()
    for hub in list(_hubs):
        hub.wake_all()


class Hub:
    """Wakes the streams of a user when that user has new events."""

    def __init__(self, database_url: str, redis_url: str | None, max_streams: int,
                 heartbeat_s: float = 15.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.mode = ("postgres" if database_url.startswith("postgresql")
                     else "redis" if redis_url else "poll")
        self._database_url, self._redis_url = database_url, redis_url
        self._waiters: dict[str, set[threading.Event]] = {}
        # The watch lease (PostgreSQL): long enough that a stream, which wakes at least
        # every heartbeat, renews it (at half its length) well before it lapses.
        self.lease_s = max(60.0, 4 * heartbeat_s)
        self._renew_at: dict[str, float] = {}  # user → when this process renews the lease
        self._clock = clock
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_streams)
        self._listener: threading.Thread | None = None
        self.connected = threading.Event()
        _hubs.add(self)

    @property
    def pushing(self) -> bool:
        return self.mode != "poll" and self.connected.is_set()

    def subscribe(self, user_id: str) -> threading.Event:
        if not self._slots.acquire(blocking=False):
            raise ServiceUnavailable("Too many open event streams on this server; retry shortly")
        woken = threading.Event()
        with self._lock:
            self._waiters.setdefault(user_id, set()).add(woken)
            if self.mode != "poll" and (self._listener is None or not self._listener.is_alive()):
                self._listener = threading.Thread(target=self._listen, name="event-listener",
                                                  daemon=True)
                self._listener.start()
        return woken

    def unsubscribe(self, user_id: str, woken: threading.Event) -> None:
        with self._lock:
            waiters = self._waiters.get(user_id)
            if waiters is not None:
                waiters.discard(woken)
                if not waiters:
                    del self._waiters[user_id]
        self._slots.release()

    def keep_watched(self, db: Any, user_id: str) -> bool:
        """True when writers will announce ``user_id``'s new events to this process (so a
        stream may wait for a wake-up); False when the stream must re-read on its own.

        PostgreSQL: takes or renews the user's watch lease when due (committed before it
        returns, so the caller's next read of the log misses nothing that committed
        without a NOTIFY). False when the database could not be reached; asked again at
        the stream's next turn."""
        if self.mode != "postgres":
            return self.mode == "redis"
        if self.holds(user_id):
            return True
        now = self._clock()  # before the UPDATE: the lease it takes ends later than now + lease_s
        try:
            queries.watch_events(db, user_id, self.lease_s)
        except DBAPIError as e:
            log.warning("event stream lease not taken (%s); the stream polls", type(e).__name__)
            return False
        with self._lock:
            self._renew_at[user_id] = now + self.lease_s / 2
            if len(self._renew_at) > 100_000:  # users long gone: renewed again if back
                self._renew_at = {u: t for u, t in self._renew_at.items() if t > now}
        return True

    def holds(self, user_id: str) -> bool:
        """PostgreSQL: this process took ``user_id``'s lease less than half its length ago,
        so at least ``lease_s / 2`` of it (two heartbeats or more) is left."""
        with self._lock:
            return self._clock() < self._renew_at.get(user_id, 0.0)

    def wake(self, user_id: str) -> None:
        with self._lock:
            for woken in self._waiters.get(user_id, ()):
                woken.set()

    def wake_all(self) -> None:
        with self._lock:
            for waiters in self._waiters.values():
                for woken in waiters:
                    woken.set()

    def _listen(self) -> None:
        """Forever: connect, wake streams on each notification; reconnect on failure."""
        delay = 0.5
        while True:
            try:
                if self.mode == "postgres":
                    self._listen_postgres()
                else:
                    self._listen_redis()
                delay = 0.5
            except Exception as e:  # noqa: BLE001 - the listener must survive outages
                self.connected.clear()
                log.warning("event listener (%s) lost its connection (%s); streams poll meanwhile",
                            self.mode, type(e).__name__)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
            with self._lock:
                if not self._waiters:
                    self.connected.clear()
                    self._listener = None
                    return

    def _idle(self) -> bool:
        with self._lock:
            return not self._waiters

    def _listen_postgres(self) -> None:
        import psycopg

        dsn = make_url(self._database_url).set(drivername="postgresql").render_as_string(
            hide_password=False)
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f"LISTEN {events.CHANNEL}")
            self.connected.set()
            self.wake_all()  # anything committed while we were not listening
            while not self._idle():
                for note in conn.notifies(timeout=1.0):
                    self.wake(note.payload)

    def _listen_redis(self) -> None:
        import redis

        client = redis.Redis.from_url(self._redis_url, socket_connect_timeout=5,
                                      health_check_interval=30)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(events.CHANNEL)
            self.connected.set()
            self.wake_all()
            while not self._idle():
                message = pubsub.get_message(timeout=1.0)
                if message and message.get("type") == "message":
                    self.wake(message["data"].decode())
        finally:
            pubsub.close()
            client.close()


def init_app(app: Flask) -> None:
    settings = app.extensions["orchestrator"].settings
    app.extensions["event_hub"] = Hub(settings.database_url, settings.redis_url,
                                      settings.sse_max_streams, settings.sse_heartbeat_seconds)
    events.configure_push(settings.database_url, settings.redis_url)
    app.register_blueprint(bp)


# --- the streams ------------------------------------------------------------------------------


def _resume_point() -> int:
    """``Last-Event-ID`` (what browsers send on reconnect), else ``?since=``, else 0."""
    query = EventsQuery.from_request()
    header = request.headers.get("Last-Event-ID")
    if header is None:
        return query.since
    header = header.strip()
    if not (header.isascii() and header.isdigit() and len(header) <= 17):
        raise InvalidRequest("Last-Event-ID must be a non-negative integer",
                             details={"field": "Last-Event-ID"})
    return int(header)


def _frame(event_id: int | None, kind: str, data: Any) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _queued_positions(user_id: str, job_id: str | None) -> dict[str, int]:
    with services().db.session() as session:
        if job_id is not None:
            return queues.positions(session, [job_id])
        return queues.user_positions(session, user_id)


def _stream(user_id: str, after: int, job_id: str | None, woken: threading.Event,
            hub: Hub, ended: bool = False) -> Iterator[str]:
    """``ended``: the job had already ended when the stream opened (it stops once caught up)."""
    svc = services()
    settings = svc.settings
    yield f"retry: 2000\n: stream of {'job ' + job_id if job_id else 'your jobs'}\n\n"
    deadline = time.monotonic() + settings.sse_max_seconds
    last_write = time.monotonic()
    next_queue_check = 0.0
    found: dict[str, int] = {}
    sent_queue: dict[str, tuple[int, float | None]] = {}
    while time.monotonic() < deadline and not _closing.is_set():
        woken.clear()  # before reading: a notification during the read wakes the next wait
        announced = hub.keep_watched(svc.db, user_id)  # before reading, too
        try:
            with svc.db.session() as session:
                batch = events.since(session, user_id, after, job_id=job_id)
        except DBAPIError as e:  # the database went away: keep the stream, try again
            log.warning("event stream read failed (%s); retrying", type(e).__name__)
            woken.wait(1.0)
            continue
        finished = False
        for e in batch:
            after = e.id
            yield _frame(e.id, e.type, events.wire(e))
            finished = finished or (job_id is not None and e.type in TERMINAL)
        if batch:
            last_write = time.monotonic()
        if finished or (ended and not batch):
            return
        if time.monotonic() >= next_queue_check:
            # Positions move when anyone's job starts: recomputed on a tick, after the events.
            next_queue_check = time.monotonic() + QUEUE_TICK_S
            try:
                found = _queued_positions(user_id, job_id)
            except DBAPIError:
                found = {}
            for queued_id, position in found.items():
                eta = svc.estimates.eta_seconds(_job_type(queued_id), position)
                if sent_queue.get(queued_id) != (position, eta):
                    sent_queue[queued_id] = (position, eta)
                    yield _frame(None, "queue", {"job_id": queued_id, "queue_position": position,
                                                 "eta_seconds": eta})
                    last_write = time.monotonic()
            for gone in set(sent_queue) - set(found):
                del sent_queue[gone]
        wait = settings.sse_heartbeat_seconds - (time.monotonic() - last_write)
        if not (hub.pushing and announced):
            wait = min(wait, POLL_S)
        if found:
            wait = min(wait, next_queue_check - time.monotonic())
        if announced and hub.mode == "postgres" and not hub.holds(user_id):
            continue  # the lease is due (a slow client held the stream up): renew, read again
        if not woken.wait(max(0.0, wait)) and \
                time.monotonic() - last_write >= settings.sse_heartbeat_seconds:
            yield ": keepalive\n\n"
            last_write = time.monotonic()


_types: dict[str, str] = {}


def _job_type(job_id: str) -> str:
    """A job's type never changes: cache it for the ETA of queue events."""
    if job_id not in _types:
        with services().db.session() as session:
            _types[job_id] = session.execute(select(Job.job_type).where(Job.id == job_id)).scalar_one()
        if len(_types) > 100_000:
            _types.clear()
    return _types[job_id]


def _sse(user_id: str, after: int, job_id: str | None, ended: bool = False) -> Response:
    """Take a stream slot now (503 when full), give it back when the response closes,
    whether or not the stream ever started."""
    hub: Hub = current_app.extensions["event_hub"]
    woken = hub.subscribe(user_id)
    response = Response(stream_with_context(_stream(user_id, after, job_id, woken, hub, ended)),
                        mimetype="text/event-stream")
    released = threading.Event()

    def release() -> None:
        if not released.is_set():
            released.set()
            hub.unsubscribe(user_id, woken)

    response.call_on_close(release)
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
    return response


_STREAM = {200: Reply(description=(
    "`text/event-stream`: `id:`/`event:`/`data:` frames of the event log (data: `{id, type, "
    "entity, entity_id, job_id, payload, created_at}`, payload the full new row), `event: queue` "
    "frames without id (`{job_id, queue_position, eta_seconds}`) and `: keepalive` comments"),
    content={"text/event-stream": {
        "type": "object", "description": "One event of the stream",
        "properties": {
            "id": {"type": "string", "pattern": "^[0-9]+$", "description": "The log's event id"},
            "event": {"type": "string", "description": "`job.<status>`, `job.progress`, "
                      "`image.<status>`, `video.<status>` or `queue`"},
            "data": {"type": "string", "description": "The event as JSON"},
            "retry": {"type": "integer", "description": "Reconnect delay (ms)"}}}})}


@bp.get("/events")
@spec(summary="Live events of the caller's jobs, images and videos (SSE)", tags=["events"],
      auth="user", query=EventsQuery, headers={"Last-Event-ID": LastEventId}, responses=_STREAM,
      errors=(503,), description=(
          "Server-Sent Events, resumable with `Last-Event-ID`. Tokens go in the `Authorization` "
          "header only, so browsers read it with `fetch()` rather than `EventSource`."))
@user_required
def user_events() -> Response:
    """Every event of the caller's jobs, images and videos, live."""
    return _sse(g.user_id, _resume_point(), None)


@bp.get("/jobs/<job_id>/events")
@spec(summary="Live events of one job (SSE); ends after its terminal event", tags=["events"],
      auth="user", path={"job_id": JobId}, query=EventsQuery,
      headers={"Last-Event-ID": LastEventId}, responses=_STREAM, errors=(404, 503))
@user_required
def job_events(job_id: str) -> Response:
    """One job's events; the stream ends after its terminal event."""
    job = queries.get_job(services().db, g.user_id, job_id)  # 404 exactly like any unknown id
    return _sse(g.user_id, _resume_point(), job.id, JobStatus(job.status).is_terminal)


@bp.get("/queues")
@spec(summary="Queue depth, wait, workers and run times per family", tags=["queues"],
      auth="user", responses={200: QueuesAnswer}, errors=(503,))
@user_required
def queue_stats() -> Any:
    return jsonify({"queues": [dataclasses.asdict(q) for q in queues.family_stats(services().db)]})
