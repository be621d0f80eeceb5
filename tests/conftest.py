"""Fixtures over real servers: PostgreSQL, Redis and SQLite files built by the
real Alembic migrations. Nothing is mocked but true boundaries.

Each test run gets its own PostgreSQL database and its own Redis database
number, so a developer's running service is never touched.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import psycopg
import pytest
import redis as redis_lib
from sqlalchemy import text

PG_ADMIN = os.environ.get("TEST_PG_ADMIN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")
PG_URL_BASE = os.environ.get("TEST_PG_URL_BASE", "postgresql+psycopg://postgres@127.0.0.1:5432")
REDIS_BASE = os.environ.get("TEST_REDIS_BASE", "redis://127.0.0.1:6379")
REDIS_DB = int(os.environ.get("TEST_REDIS_DB", "11"))
TEST_REDIS_URL = f"{REDIS_BASE}/{REDIS_DB}"

# The in-process Celery app (used to publish from the Flask test client) reads
# the environment once: point it at the test Redis before anything reads it.
os.environ["BROKER_URL"] = TEST_REDIS_URL
os.environ["RESULT_BACKEND"] = TEST_REDIS_URL
os.environ.setdefault("VAR_DIR", str(Path(__file__).resolve().parent.parent / "var" / "test"))

from orchestrator import migrations  # noqa: E402
from orchestrator.config import Settings  # noqa: E402
from orchestrator.db import Database  # noqa: E402
from orchestrator.models import Base  # noqa: E402
from orchestrator.tokens import mint_user_token  # noqa: E402

BACKENDS = ("sqlite", "postgres")


@pytest.fixture(scope="session")
def redis_client() -> Iterator[redis_lib.Redis]:
    client = redis_lib.Redis.from_url(TEST_REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this run, dropped at the end."""
    name = f"orch_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"{PG_URL_BASE}/{name}"
    migrations.upgrade(url)
    yield url
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def sqlite_database(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'orchestrator.sqlite'}"
    migrations.upgrade(url)
    return url


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue("pg_database" if backend == "postgres" else "sqlite_database")


def wipe(db: Database) -> None:
    """Empty every table (children first) so each test starts clean."""
    with db.transaction() as session:
        for table in reversed(Base.metadata.sorted_tables):
            session.execute(text(f"DELETE FROM {table.name}"))


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings.from_env({
        "DATABASE_URL": database_url,
        "BROKER_URL": TEST_REDIS_URL,
        "RESULT_BACKEND": TEST_REDIS_URL,
        "VAR_DIR": str(tmp_path / "var"),
        "STORAGE_ROOT": str(tmp_path / "storage"),
        # Tests submit many jobs as one user; tests/test_rate_limits.py sets real limits.
        "SUBMIT_RATE_LIMIT": "1000/second",
        "MAX_ACTIVE_JOBS": "0",
    })


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    database = Database(settings.database_url)
    wipe(database)
    yield database
    database.dispose()


@pytest.fixture
def app(settings: Settings, db: Database, redis_client: redis_lib.Redis) -> Any:
    from web import create_app

    application = create_app(settings)
    application.config["TESTING"] = True
    yield application
    application.extensions["orchestrator"].dispatch_marks.close()  # its last marks, then no thread
    application.extensions["orchestrator"].db.dispose()


@pytest.fixture
def client(app: Any) -> Any:
    return app.test_client()


@pytest.fixture
def make_user(settings: Settings) -> Callable[..., tuple[str, dict[str, str]]]:
    """A new user id and the Authorization header of a valid token for it."""

    def _make(**claims: Any) -> tuple[str, dict[str, str]]:
        user_id = str(uuid.uuid4())
        token = mint_user_token(settings, user_id, extra=claims or None)
        return user_id, {"Authorization": f"Bearer {token}"}

    return _make


@pytest.fixture
def worker_headers(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.worker_token}"}


@pytest.fixture
def worker_runtime(settings: Settings, db: Database) -> Iterator[Any]:
    """The per-process worker runtime pointed at the test database and storage,
    so tasks can be called as functions in this process."""
    from orchestrator.enhancer import get_enhancer
    from orchestrator.jobtypes import BUCKETS
    from orchestrator.storage import LocalStorage
    from tasks import runtime

    rt = runtime.Runtime(settings=settings, db=db,
                         storage=LocalStorage(settings.storage_root, buckets=BUCKETS),
                         enhancer=get_enhancer("rules"))
    runtime._runtime = rt
    yield rt
    runtime._runtime = None
