"""Engine and sessions: one :class:`Database` per process, built from settings.

SQLite (the embedded default) is shared by the web process and both worker
families, so it runs in WAL mode with a long busy timeout, and every
transaction starts with ``BEGIN IMMEDIATE``: a writer takes the write lock up
front instead of failing to upgrade a read lock half-way ("database is
locked"). PostgreSQL needs none of that.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_S = 30


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine with the pragmas and pool settings each backend needs."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}, **kwargs
        )
        _configure_sqlite(engine)
        return engine
    kwargs.setdefault("pool_size", 5)
    # The most recently returned connection first: under a steady load only as many
    # connections (server processes) stay busy as requests run at once, their caches warm;
    # first-in-first-out cycled through all of them (PostgreSQL's CPU per submission,
    # measured under the bench's load: 0.79 -> 0.66 ms). The rest idle, and are pinged
    # before their next use (_ping_when_idle).
    kwargs.setdefault("pool_use_lifo", True)
    kwargs.setdefault("max_overflow", 10)
    engine = create_engine(url, **kwargs)
    if not kwargs.get("pool_pre_ping"):
        _ping_when_idle(engine)
    return engine


#: A pooled connection checked in less than this long ago is used without a ping.
PING_AFTER_IDLE_S = 2.0


def _ping_when_idle(engine: Engine) -> None:
    """SQLAlchemy's ``pool_pre_ping``, for connections that sat idle only: a server
    restart or a dropped idle connection is found (and the connection replaced) before
    use, as with ``pool_pre_ping``, but a connection in steady use (a busy worker, a web
    process under load) costs no ``SELECT 1`` round trip per transaction. One that dies
    within the window fails its statement, which the pool then replaces, as any
    connection lost in the middle of a transaction."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, record: Any) -> None:
        record.info["checked_in"] = time.monotonic()

    @event.listens_for(engine, "checkin")
    def _on_checkin(dbapi_conn: Any, record: Any) -> None:
        if record is not None:
            record.info["checked_in"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, record: Any, proxy: Any) -> None:
        if time.monotonic() - record.info.get("checked_in", 0.0) < PING_AFTER_IDLE_S:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except engine.dialect.loaded_dbapi.Error as e:
            if engine.dialect.is_disconnect(e, dbapi_conn, None):
                raise DisconnectionError() from e  # the pool connects again (and retries)
            raise


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy, not pysqlite, decide when transactions begin.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # FULL: a job the API acknowledged survives a power cut.
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Writers take the write lock up front; readers share the WAL snapshot.
        mode = "IMMEDIATE" if conn.get_execution_options().get("sqlite_write") else "DEFERRED"
        conn.exec_driver_sql(f"BEGIN {mode}")


class Database:
    """The engine and session factory of one process."""

    def __init__(self, url: str, **engine_kwargs: Any) -> None:
        self.url = url
        self.engine = make_engine(url, **engine_kwargs)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False, autoflush=False)
        # The same pool, with writes flagged so SQLite begins them IMMEDIATE.
        self._writes = sessionmaker(self.engine.execution_options(sqlite_write=True),
                                    expire_on_commit=False, autoflush=False)
        self._autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self._prepared: dict[Any, Prepared] = {}

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session in one write transaction: committed on success, rolled back on error."""
        with self._writes() as session, session.begin():
            yield session

    def session(self) -> Session:
        """A session for reads (on SQLite it does not take the write lock)."""
        return self._sessions()

    @contextlib.contextmanager
    def writer(self) -> Iterator[Any]:
        """Where one write statement runs as its own transaction: on PostgreSQL a connection
        outside any transaction (no BEGIN and COMMIT round trips), on SQLite a write
        transaction (its BEGIN IMMEDIATE takes the one writer's lock first)."""
        if self.dialect == "postgresql":
            with self.autocommit() as conn:
                yield conn
        else:
            with self.transaction() as session:
                yield session

    def autocommit(self) -> Connection:
        """A connection outside any transaction, for a single-statement read: on
        PostgreSQL no BEGIN and no ROLLBACK round trips around it."""
        return self._autocommit.connect()

    @contextlib.contextmanager
    def driver_cursor(self) -> Iterator[Any]:
        """PostgreSQL: a cursor of the driver (psycopg) on a pooled connection outside any
        transaction, for one statement with the driver's placeholders (a submission, a
        worker's transition: :meth:`first`): each statement is its own transaction, as in
        :meth:`autocommit`.

        Under SQLAlchemy's ``Connection`` the same statement costs about twice the
        Python: a ``Connection`` and an execution context per use, the isolation level set
        and reset through the dialect, the result's metadata built from the cursor, and
        six waits in the driver, each of which lets go of the GIL (under load, other
        threads take it each time). Here: the pool's checkout and checkin (with their
        events: :func:`_ping_when_idle` still runs), ``autocommit`` on, the statement, and
        off again. What ``Connection`` does on an error is kept: the driver's error is
        raised as SQLAlchemy's (``OperationalError``, ``DataError``…, which the web answers
        503 and 400 as before, without the statement or its parameters), also when no
        connection could be had (the server down), and a connection found dead is dropped
        from the pool rather than handed out again.
        Statements run here are not seen by the engine's cursor events (tests count them
        at the driver).
        """
        dbapi_error = self.engine.dialect.loaded_dbapi.Error
        try:
            fairy = self.engine.raw_connection()
        except dbapi_error as e:  # no connection to be had (the pool raises the driver's)
            raise DBAPIError.instance(None, None, e, dbapi_error, connection_invalidated=(
                self.engine.dialect.is_disconnect(e, None, None)),
                dialect=self.engine.dialect) from e
        driver = fairy.driver_connection
        cursor = None
        try:
            driver.autocommit = True
            try:
                cursor = driver.cursor()
                yield cursor
            finally:
                if cursor is not None:
                    cursor.close()
                if not driver.closed:
                    driver.autocommit = False
        except dbapi_error as e:
            dead = self.engine.dialect.is_disconnect(e, driver, cursor)
            if dead:
                fairy.invalidate(e)
            # Without the statement and its parameters (a user's prompt is no log line's).
            raise DBAPIError.instance(None, None, e, dbapi_error, connection_invalidated=dead,
                                      dialect=self.engine.dialect) from e
        finally:
            fairy.close()

    def prepared(self, key: Any, build: Callable[[], Any]) -> "Prepared":
        """The statement ``build()`` makes, compiled once for this database (per ``key``:
        what ``build`` depends on), to be run by :meth:`first`."""
        prepared = self._prepared.get(key)
        if prepared is None:
            prepared = self._prepared[key] = Prepared(build(), self.engine.dialect)
        return prepared

    def first(self, sql: str, params: dict[str, Any]) -> tuple[Any, ...] | None:
        """PostgreSQL: one statement with the driver's placeholders (a submission's, or a
        :class:`Prepared`'s ``sql`` and ``parameters``) as its own transaction on the
        driver's cursor (:meth:`driver_cursor`); its first row, as the driver returns it (no
        result processing: for statements whose columns the driver already returns as
        wanted, such as JSONB payloads)."""
        with self.driver_cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchone()

    def dispose(self) -> None:
        self.engine.dispose()


class Prepared:
    """A Core statement compiled once for a dialect, run by :meth:`Database.first`.

    SQLAlchemy's ``Connection.execute`` of the same statement builds its cache key (a walk
    of the whole statement) and an execution context on every call: about 100 µs of CPU
    for the transitions' statements, each run once per job. Here the SQL text, the bound
    parameters' defaults and their bind processors (the dialect's JSONB wrapping, the
    columns' own types) come from one compilation; a call fills in the values and
    processes them as SQLAlchemy would. The processors are the compiled statement's
    ``_bind_processors``, which SQLAlchemy's execution context reads the same way (a private
    attribute: tests/test_round_trips.py holds the values sent equal to SQLAlchemy's)."""

    def __init__(self, statement: Any, dialect: Any) -> None:
        compiled = statement.compile(dialect=dialect)
        if (compiled.positiontup is not None or compiled.escaped_bind_names
                or compiled.literal_execute_params or compiled.post_compile_params):
            raise ValueError("Prepared: named parameters with plain names only, none expanded")
        self.sql: str = compiled.string
        self._compiled = compiled
        self._processors: dict[str, Callable[[Any], Any]] = dict(compiled._bind_processors)

    def parameters(self, values: dict[str, Any]) -> dict[str, Any]:
        params = self._compiled.construct_params(values)
        for name, process in self._processors.items():
            if name in params:
                params[name] = process(params[name])
        return params
