"""The round-trip budget of the hot paths: how many SQL statements one
queue-job request, one worker transition (claim, completion) and one job-callback
request send. Raising a budget must be a deliberate change."""
from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import psycopg
from sqlalchemy import text

from orchestrator import completion, submission
from orchestrator import db as db_module
from orchestrator.db import Database
from orchestrator.models import Job
from orchestrator.status import JobStatus
from tests.conftest import PG_ADMIN, wipe
from tests.helpers import count_statements, submit

# Round trips per request for a returning user (profile exists). PostgreSQL: one WITH
# statement run outside a transaction (so it is its own: no BEGIN, no COMMIT) that debits
# (UPDATE … RETURNING, which also locks the profile and NOTIFYs if watched), inserts the image, the
# job, the ledger entry and the events, and answers the balance and the queue length
# (orchestrator.submission._submit_in_one_statement). SQLite, one transaction: its BEGIN
# IMMEDIATE, the debit, the four INSERTs, COMMIT. The dispatch mark after publishing is
# batched by another thread (orchestrator.dispatch_marks), so it is not this request's.
QUEUE_JOB_BUDGET = {"postgresql": 1, "sqlite": 7}


def _count(app: Any) -> tuple[list[str], Any]:
    """This thread's statements (the request's, not the dispatch-mark thread's)."""
    return count_statements(app.extensions["orchestrator"].db.engine, threading.get_ident())


def test_queue_job_statement_budget(app: Any, client: Any, make_user: Any) -> None:
    _, headers = make_user()
    body = {"jobType": "image_fast", "metadata": {"prompt": "a lighthouse"}}
    assert client.post("/functions/v1/queue-job", headers=headers, json=body).status_code == 200
    seen, stop = _count(app)
    try:
        assert client.post("/functions/v1/queue-job", headers=headers, json=body).status_code == 200
    finally:
        stop()
    statements = [s for s in seen if s not in ("PRAGMA",)]
    dialect = app.extensions["orchestrator"].db.dialect
    assert len(statements) <= QUEUE_JOB_BUDGET[dialect], statements
    assert _one_transaction(statements, dialect), statements
    assert "SELECT" not in statements, statements  # nothing read that a write could return


# --- the worker's side: orchestrator.completion ----------------------------------------------
# Statements plus COMMITs of one transition (a worker's claim, its completion), each one
# transaction. PostgreSQL: one WITH statement run outside a transaction (so it is its own:
# no BEGIN, no COMMIT) holding the CAS UPDATE … RETURNING, the asset's UPDATE, the lock (and
# NOTIFY, if watched) of the owner's profile row and the events' INSERT. SQLite: its BEGIN IMMEDIATE,
# the CAS, the asset's UPDATE, the events' INSERT, COMMIT (one writer at a time: no lock).
TRANSITION_BUDGET = {"postgresql": 1, "sqlite": 5}
# job-callback `processing` from an external worker. A claim (the job was queued): the
# transition above, the lease from the job's type computed by the database (PostgreSQL;
# SQLite reads the type first). A heartbeat (the same report again): the lease CAS,
# nothing read first.
CALLBACK_BUDGET = {"claim": {"postgresql": 1, "sqlite": 6},
                   "heartbeat": {"postgresql": 1, "sqlite": 4}}


def _one_transaction(statements: list[str], dialect: str) -> bool:
    """PostgreSQL: one statement outside a transaction; SQLite: one COMMIT."""
    if dialect == "postgresql":
        return len(statements) == 1 and "COMMIT" not in statements
    return statements.count("COMMIT") == 1


def _assert_one_transition(statements: list[str], dialect: str) -> None:
    assert len(statements) <= TRANSITION_BUDGET[dialect], statements
    assert _one_transaction(statements, dialect), statements
    assert "SELECT" not in statements, statements  # nothing read that a write could return


def test_worker_transitions_statement_budget(db: Database) -> None:
    user = str(uuid.uuid4())
    job = submit(db, user, "sdxl_image_fast", num_images=1)
    seen, stop = count_statements(db.engine, threading.get_ident())
    try:
        claimed = completion.start_job(db, job.id, worker="host:1", lease_seconds=60)
        claim, seen[:] = list(seen), []
        done = completion.finish_job(db, job.id, completion.Outcome(
            JobStatus.COMPLETED, attempt=1, assets=[f"{user}/{job.id}_0.png"],
            metadata={"generator": "test", "seeds": [1]}))
        finish, seen[:] = list(seen), []
        late = completion.finish_job(db, job.id, completion.Outcome(
            JobStatus.FAILED, attempt=1, error="late"))
        stale = list(seen)
    finally:
        stop()
    assert claimed is not None and done.changed and not late.changed
    _assert_one_transition(claim, db.dialect)
    _assert_one_transition(finish, db.dialect)
    # A late report: the CAS finds its guard closed and reads the row, nothing else.
    assert "INSERT" not in stale and stale.count("UPDATE") + stale.count("WITH") == 1, stale


def test_transitions_take_the_owners_lock_before_their_events(pg_database: str) -> None:
    """PostgreSQL: every event-writing transition locks the owner's profile row (events'
    ids follow commit order per user) in its first statement: it waits for a transaction
    that holds that lock, and changes nothing until it can."""
    db = Database(pg_database)
    wipe(db)
    try:
        user = str(uuid.uuid4())
        job = submit(db, user, "image_fast")
        done = threading.Event()
        with psycopg.connect(pg_database.replace("postgresql+psycopg://", "postgresql://")) as other:
            other.execute("SELECT 1 FROM profiles WHERE id = %s FOR UPDATE", (user,))
            claim = threading.Thread(target=lambda: (completion.start_job(
                db, job.id, worker="host:1", lease_seconds=60), done.set()))
            claim.start()
            assert not done.wait(0.5)  # blocked on the profile row
            other.rollback()
        claim.join(timeout=10)
        assert done.is_set()
        with db.session() as session:
            assert session.get(Job, job.id).status == "processing"
    finally:
        db.dispose()


def test_an_idle_pooled_connection_is_checked_before_use(pg_database: str,
                                                         monkeypatch: Any) -> None:
    """A connection killed while idle in the pool is replaced before use (no error); a busy
    one is used without the ping's round trip."""
    monkeypatch.setattr(db_module, "PING_AFTER_IDLE_S", 0.2)
    db = Database(pg_database, pool_size=1, max_overflow=0)
    try:
        with db.transaction() as session:
            pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        time.sleep(0.3)
        with db.transaction() as session:
            assert session.execute(text("SELECT pg_backend_pid()")).scalar_one() != pid
    finally:
        db.dispose()


def test_driver_cursor_keeps_what_a_connection_does_on_errors(pg_database: str) -> None:
    """Database.driver_cursor (the submission's one statement): each statement is its own
    transaction; a driver error comes out as SQLAlchemy's (the web answers a lost database
    503 and a refused value 400 from those); a connection found dead leaves the pool and the
    next use gets a live one; the connection goes back to the pool out of autocommit."""
    from sqlalchemy.exc import DataError, OperationalError

    db = Database(pg_database, pool_size=1, max_overflow=0)
    try:
        with db.driver_cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid(), now() = statement_timestamp()")
            pid, own_transaction = cursor.fetchone()
        assert own_transaction
        with db.driver_cursor() as cursor:
            cursor.execute("SELECT txid_current()")
            first = cursor.fetchone()[0]
            cursor.execute("SELECT txid_current()")
            assert cursor.fetchone()[0] != first  # no transaction spans two statements
        try:
            with db.driver_cursor() as cursor:
                cursor.execute("SELECT CAST(%(v)s AS integer)", {"v": "not a number"})
        except DataError as e:
            assert not e.connection_invalidated
        else:
            raise AssertionError("no DataError")
        with db.transaction() as session:  # the pooled connection, back out of autocommit
            assert session.execute(text("SELECT pg_backend_pid()")).scalar_one() == pid
            assert session.connection().connection.driver_connection.autocommit is False
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        time.sleep(0.1)
        try:
            with db.driver_cursor() as cursor:
                cursor.execute("SELECT 1")
        except OperationalError as e:
            assert e.connection_invalidated
        else:
            raise AssertionError("no OperationalError")
        with db.driver_cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            assert cursor.fetchone()[0] != pid
    finally:
        db.dispose()


def test_job_callback_statement_budget(app: Any, client: Any, make_user: Any,
                                       worker_headers: dict[str, str]) -> None:
    _, headers = make_user()
    body = {"jobType": "image_fast", "metadata": {"prompt": "a lighthouse"}}
    job_id = client.post("/functions/v1/queue-job", headers=headers, json=body).json["job"]["id"]
    report = {"job_id": job_id, "status": "processing"}
    dialect = app.extensions["orchestrator"].db.dialect
    for kind in ("claim", "heartbeat"):
        seen, stop = _count(app)
        try:
            resp = client.post("/functions/v1/job-callback", headers=worker_headers, json=report)
        finally:
            stop()
        assert resp.status_code == 200 and resp.json["status"] == "processing", resp.json
        assert len(seen) <= CALLBACK_BUDGET[kind][dialect], (kind, seen)
        assert _one_transaction(seen, dialect), (kind, seen)
        if dialect == "postgresql":
            assert "SELECT" not in seen, (kind, seen)


def test_one_statement_writes_fit_psycopgs_query_cache() -> None:
    """psycopg converts a query's placeholders once and caches the result only for
    queries up to 4 KiB (and 50 parameters): the one-statement transitions and submission
    stay below, or
    every execution parses its text again (a cost, not an error)."""
    from psycopg import _queries
    from sqlalchemy.dialects.postgresql import psycopg as pg

    dialect = pg.dialect()
    shapes = [completion._one_statement(completion._claim(), JobStatus.PROCESSING, False, False,
                                        None, True),
              completion._one_statement(completion._report_claim(False, True),
                                        JobStatus.PROCESSING, False, False, None, True),
              completion._one_statement(completion._progress(), JobStatus.PROCESSING, False,
                                        False, "progress", False)]
    for enhanced in (False, True):
        finish = completion._finish_cached("postgresql", JobStatus.COMPLETED, True, enhanced,
                                           True, ())
        shapes.append(completion._one_statement(finish, JobStatus.COMPLETED, True, True, None,
                                                True))
    for stmt in shapes:
        compiled = stmt.compile(dialect=dialect)
        assert len(str(compiled)) <= _queries.MAX_CACHED_STATEMENT_LENGTH
        assert len(compiled.params) <= _queries.MAX_CACHED_STATEMENT_PARAMS
    for sql in submission._ONE_STATEMENT.values():  # the driver's placeholders already
        assert len(sql.encode()) <= _queries.MAX_CACHED_STATEMENT_LENGTH


def test_driver_cursor_without_a_server_raises_sqlalchemys_error() -> None:
    """No connection to be had (the database server down): the driver cursor (submission,
    worker transitions) raises SQLAlchemy's OperationalError, as a Connection would, which
    the web answers 503 and the workers retry (tests/test_faults.py, a server stopped)."""
    from sqlalchemy.exc import OperationalError

    from tests.stack import free_port

    db = Database(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nowhere",
                  connect_args={"connect_timeout": 2})
    try:
        try:
            with db.driver_cursor() as cursor:
                cursor.execute("SELECT 1")
        except OperationalError as e:
            assert "[SQL:" not in str(e)
        else:
            raise AssertionError("no OperationalError")
    finally:
        db.dispose()


def test_prepared_statements_bind_as_sqlalchemy_does(pg_database: str) -> None:
    """Database.prepared/first: a Core statement compiled once, run on the driver's cursor,
    sends the values SQLAlchemy's execute would (its types' bind processing: JSONB, the
    UTC timestamps, UUIDs, bound defaults) and returns the driver's row; errors come out
    as SQLAlchemy's, without the statement."""
    import datetime as dt

    from sqlalchemy import Integer, bindparam, cast, literal, select
    from sqlalchemy.dialects.postgresql import JSONB
    from sqlalchemy.exc import DataError

    from orchestrator.models import UTCDateTime

    db = Database(pg_database)
    try:
        stmt = select(cast(bindparam("j", type_=JSONB), JSONB),
                      bindparam("t", type_=UTCDateTime) - literal(dt.timedelta(hours=1)),
                      cast(bindparam("u"), Job.__table__.c.id.type),
                      cast(bindparam("n"), Integer) + literal(1))
        values = {"j": {"a": [1, "x"], "b": None}, "t": dt.datetime(2026, 1, 2, 3, 4, 5,
                                                                    tzinfo=dt.timezone.utc),
                  "u": str(uuid.uuid4()), "n": 41}
        with db.writer() as conn:
            expected = tuple(conn.execute(stmt, values).first())
        prepared = db.prepared(("test", 1), lambda: stmt)
        assert db.prepared(("test", 1), lambda: None) is prepared  # compiled once
        row = db.first(prepared.sql, prepared.parameters(values))
        assert row[0] == expected[0] == values["j"]
        assert row[1] == expected[1] == values["t"] - dt.timedelta(hours=1)
        assert str(row[2]) == str(expected[2]) == values["u"]
        assert row[3] == expected[3] == 42
        try:
            db.first(prepared.sql, prepared.parameters({**values, "n": "forty-one"}))
        except DataError as e:
            assert "[SQL:" not in str(e) and "[parameters:" not in str(e)
        else:
            raise AssertionError("no DataError")
    finally:
        db.dispose()
