"""Small factories shared by the tests (plain functions, no magic)."""
from __future__ import annotations

import io
import time
from typing import Any, Callable

from orchestrator import submission
from orchestrator.db import Database
from orchestrator.models import Job


def submit(db: Database, user_id: str, job_type: str = "image_fast", prompt: str = "a red fox",
           **metadata: Any) -> Job:
    """Record a job through the domain (no broker), as queue-job would."""
    req = submission.SubmitRequest(job_type=job_type, metadata={"prompt": prompt, **metadata})
    return submission.submit_job(db, user_id, req, max_attempts=3).job


def png_info(data: bytes) -> tuple[str, tuple[int, int]]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.format, im.size


def mp4_info(data: bytes) -> dict[str, Any]:
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return {"codec": stream.codec_context.name, "width": stream.width, "height": stream.height,
                "frames": frames, "fps": float(stream.average_rate)}


def balance(client: Any, headers: dict[str, str]) -> int:
    """The user's token balance, through the API."""
    resp = client.get("/v1/me", headers=headers)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return resp.get_json()["token_balance"]


def assert_json_error(resp: Any, status: int) -> dict[str, Any]:
    """A JSON error body of the service's shape, with no trace in it."""
    assert resp.status_code == status, (resp.status_code, resp.get_data(as_text=True))
    assert resp.is_json, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["success"] is False
    assert isinstance(body["error"], str) and body["error"]
    assert "Traceback" not in resp.get_data(as_text=True)
    return body


def wait_until(check: Callable[[], Any], timeout: float = 3.0, interval: float = 0.02) -> Any:
    """Poll ``check`` until it returns something truthy (returned) or ``timeout`` passes
    (then its last value is returned, for the caller's assert)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def count_statements(engine: Any, thread: int | None = None) -> tuple[list[str], Callable[[], None]]:
    """What is sent to ``engine``'s database (every PostgreSQL database when None) by
    ``thread`` (every thread when None), until the returned ``stop()``: the first word of
    each statement, and ``COMMIT`` for each commit. PostgreSQL's are counted at the driver
    (psycopg's cursors and connections), so a statement on a bare driver cursor
    (``Database.driver_cursor``) counts as much as one through SQLAlchemy; SQLite's through
    the engine's events."""
    import threading

    from sqlalchemy import event

    seen: list[str] = []

    def mine() -> bool:
        return thread is None or threading.get_ident() == thread

    def word(statement: Any) -> str:
        text = statement.decode() if isinstance(statement, bytes) else str(statement)
        return text.split(None, 1)[0].upper()

    if engine is None or engine.dialect.name == "postgresql":
        import psycopg

        database = None if engine is None else engine.url.database
        patched = [(psycopg.Cursor, "execute"), (psycopg.Cursor, "executemany"),
                   (psycopg.Connection, "commit")]
        originals = [getattr(cls, name) for cls, name in patched]

        def counting(cls: Any, name: str, original: Any) -> Any:
            def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
                conn = self if cls is psycopg.Connection else self.connection
                if mine() and database in (None, conn.info.dbname):
                    seen.append("COMMIT" if name == "commit" else word(args[0]))
                return original(self, *args, **kwargs)
            return wrapper

        for (cls, name), original in zip(patched, originals):
            setattr(cls, name, counting(cls, name, original))

        def stop() -> None:
            for (cls, name), original in zip(patched, originals):
                setattr(cls, name, original)
        return seen, stop

    def on_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if mine():
            seen.append(word(statement))

    def on_commit(conn: Any) -> None:
        if mine():
            seen.append("COMMIT")

    event.listen(engine, "before_cursor_execute", on_execute)
    event.listen(engine, "commit", on_commit)

    def stop_events() -> None:
        event.remove(engine, "before_cursor_execute", on_execute)
        event.remove(engine, "commit", on_commit)
    return seen, stop_events
