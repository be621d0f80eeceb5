"""PostgreSQL: writers NOTIFY a user's new events only while an event stream watches the
user (the lease of orchestrator.events.watch), and the lease cannot miss a writer: it
waits for one holding the profile row's lock, and one that was waiting for it sees it."""
from __future__ import annotations

import threading
import uuid
from typing import Any, Callable, Iterator

import psycopg
import pytest

from orchestrator import completion, events, queries
from orchestrator.completion import Outcome
from orchestrator.db import Database
from orchestrator.models import Job
from orchestrator.status import JobStatus
from tests.conftest import wipe
from tests.helpers import submit


@pytest.fixture()
def pg(pg_database: str) -> Iterator[tuple[Database, str]]:
    db = Database(pg_database)
    wipe(db)
    yield db, pg_database.replace("postgresql+psycopg://", "postgresql://")
    db.dispose()


@pytest.fixture()
def listener(pg: tuple[Database, str]) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg[1], autocommit=True) as conn:
        conn.execute(f"LISTEN {events.CHANNEL}")
        yield conn


def announced(listener: psycopg.Connection[Any], timeout: float = 0.3) -> list[str]:
    """The user ids announced since the last call (notifications delivered by then)."""
    return [note.payload for note in listener.notifies(timeout=timeout)]


def every_writer(db: Database, user: str) -> dict[str, Callable[[], Any]]:
    """Each kind of event-writing statement, once, by name, in an order that works (run them
    with :func:`run`)."""
    steps: dict[str, Any] = {}
    project = queries.create_project(db, user, title="p", original_prompt=None,
                                     enhanced_prompt=None, media_type="image")
    steps["submission in a transaction (the debit's UPDATE … RETURNING)"] = lambda: submit(
        db, user, "image_fast", project_id=project.id)
    job: dict[str, Any] = {}

    def two_submissions() -> None:  # the second one, to be cancelled below
        job["id"], job["cancel"] = (submit(db, user, "image_fast").id for _ in range(2))

    steps["submission in one statement"] = two_submissions
    steps["claim (a transition statement)"] = lambda: completion.start_job(
        db, job["id"], worker="host:1", lease_seconds=60)
    steps["completion"] = lambda: completion.finish_job(
        db, job["id"], Outcome(JobStatus.COMPLETED, attempt=1, assets=[f"{user}/a.png"]))
    steps["a cancel (a transition and its refund in one transaction)"] = lambda: completion.cancel_job(
        db, user, job["cancel"])
    steps["events alone (their own lock-and-NOTIFY statement)"] = lambda: event_alone(db, job["id"])
    return steps


def event_alone(db: Database, job_id: str) -> None:
    with db.transaction() as session:
        events.write(session, events.job_event(session.get(Job, job_id), "noted"))


def run(steps: dict[str, Any], listener: psycopg.Connection[Any]) -> dict[str, list[str]]:
    seen = {}
    for name, step in steps.items():
        step()
        seen[name] = announced(listener)
    return seen


def test_unwatched_users_are_not_announced(pg: tuple[Database, str],
                                           listener: psycopg.Connection[Any]) -> None:
    db, _ = pg
    user = str(uuid.uuid4())
    submit(db, user, "image_fast")  # the profile (a first submission's own path)
    announced(listener)
    seen = run(every_writer(db, user), listener)
    assert seen == {name: [] for name in seen}


def test_watched_users_are_announced_by_every_writer(pg: tuple[Database, str],
                                                     listener: psycopg.Connection[Any]) -> None:
    db, _ = pg
    user, other = str(uuid.uuid4()), str(uuid.uuid4())
    queries.watch_events(db, user, 60)  # creates the profile, as a first GET /v1/events does
    submit(db, other, "image_fast")
    announced(listener)
    seen = run(every_writer(db, user), listener)
    assert {name: set(users) for name, users in seen.items()} == {name: {user} for name in seen}
    seen = run(every_writer(db, other), listener)  # another user's: unwatched, unannounced
    assert seen == {name: [] for name in seen}, seen


def test_a_lapsed_lease_is_not_announced(pg: tuple[Database, str],
                                         listener: psycopg.Connection[Any]) -> None:
    db, dsn = pg
    user = str(uuid.uuid4())
    queries.watch_events(db, user, 60)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE profiles SET watched_until = now() - interval '1 second' "
                     "WHERE id = %s", (user,))
    submit(db, user, "image_fast")
    assert announced(listener) == []
    queries.watch_events(db, user, 60)  # renewed: announced again
    submit(db, user, "image_fast")
    assert announced(listener) == [user]


def test_a_lease_never_shortens(pg: tuple[Database, str]) -> None:
    db, dsn = pg
    user = str(uuid.uuid4())
    queries.watch_events(db, user, 600)
    queries.watch_events(db, user, 60)
    with psycopg.connect(dsn, autocommit=True) as conn:
        left = conn.execute("SELECT extract(epoch FROM watched_until - now()) FROM profiles "
                            "WHERE id = %s", (user,)).fetchone()[0]
    assert 500 < left <= 600


def test_the_lease_waits_for_a_writer_holding_the_lock(pg: tuple[Database, str],
                                                       listener: psycopg.Connection[Any]) -> None:
    """A writer that locked the profile row first (so it did not NOTIFY: no lease yet)
    commits before the lease can: the stream's read after its lease sees its events."""
    db, _ = pg
    user = str(uuid.uuid4())
    job = submit(db, user, "image_fast")
    announced(listener)
    done = threading.Event()
    with db.transaction() as session:  # a writer of the user's events, still open
        events.write(session, events.job_event(session.get(Job, job.id), "noted"))
        lease = threading.Thread(target=lambda: (queries.watch_events(db, user, 60), done.set()))
        lease.start()
        assert not done.wait(0.5)  # blocked behind the writer
    lease.join(10)
    assert done.is_set()
    assert announced(listener) == []  # the writer had no lease to see
    with db.session() as session:  # what the stream reads once its lease is committed
        assert "job.noted" in [e.type for e in events.since(session, user, 0)]


WRITERS = {
    "submission in one statement": lambda db, user, job_id, project_id: submit(db, user, "image_fast"),
    "submission in a transaction": lambda db, user, job_id, project_id: submit(
        db, user, "image_fast", project_id=project_id),
    "claim": lambda db, user, job_id, project_id: completion.start_job(
        db, job_id, worker="host:1", lease_seconds=60),
    "events alone": lambda db, user, job_id, project_id: event_alone(db, job_id),
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_writer_waiting_behind_the_lease_sees_it(pg: tuple[Database, str],
                                                   listener: psycopg.Connection[Any],
                                                   writer: str) -> None:
    """The writer's statement began before the lease committed (its snapshot has no lease)
    and waited for the row: it NOTIFYs all the same (PostgreSQL re-evaluates the statement
    on the row's latest version once it has the lock)."""
    db, dsn = pg
    user = str(uuid.uuid4())
    job = submit(db, user, "image_fast")
    project = queries.create_project(db, user, title="p", original_prompt=None,
                                     enhanced_prompt=None, media_type="image")
    announced(listener)
    done = threading.Event()
    with psycopg.connect(dsn) as watcher:
        watcher.execute("UPDATE profiles SET watched_until = now() + interval '60 seconds' "
                        "WHERE id = %s", (user,))  # the lease, not yet committed
        thread = threading.Thread(target=lambda: (WRITERS[writer](db, user, job.id, project.id),
                                                  done.set()))
        thread.start()
        assert not done.wait(0.5)  # the writer waits for the profile row
        watcher.commit()
    thread.join(10)
    assert done.is_set()
    assert announced(listener) == [user]


def lease_left(dsn: str, user: str) -> float:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return float(conn.execute("SELECT extract(epoch FROM watched_until - now()) FROM profiles "
                                  "WHERE id = %s", (user,)).fetchone()[0])


def test_a_stream_keeps_its_lease_and_renews_it_at_half_time(pg: tuple[Database, str],
                                                            pg_database: str) -> None:
    """web.live.Hub.keep_watched: the first call takes the lease (and creates the profile);
    calls within half the lease write nothing; after that the lease is renewed; without
    a database the stream is told to poll."""
    from web import live

    db, dsn = pg
    now = [1000.0]
    hub = live.Hub(pg_database, None, 4, heartbeat_s=15, clock=lambda: now[0])
    assert hub.lease_s == 60
    user = str(uuid.uuid4())
    assert hub.keep_watched(db, user) and hub.holds(user)
    assert 55 < lease_left(dsn, user) <= 60
    with psycopg.connect(dsn, autocommit=True) as conn:  # marks the row: was it written again?
        conn.execute("UPDATE profiles SET watched_until = now() + interval '45 seconds' "
                     "WHERE id = %s", (user,))
    now[0] += 29
    assert hub.keep_watched(db, user) and hub.holds(user)
    assert lease_left(dsn, user) <= 45  # not renewed: half the lease is not over
    now[0] += 2
    assert not hub.holds(user)
    assert hub.keep_watched(db, user) and hub.holds(user)
    assert lease_left(dsn, user) > 55  # renewed
    down = Database("postgresql+psycopg://postgres@127.0.0.1:1/none")
    try:
        now[0] += 31
        assert not hub.keep_watched(down, user)  # the stream polls meanwhile
        assert not hub.holds(user)
    finally:
        down.dispose()
