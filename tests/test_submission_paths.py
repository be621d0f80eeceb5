"""PostgreSQL submits a plain job (no project, no pre-created image/video, no
Idempotency-Key) as one statement (orchestrator.submission._submit_in_one_statement)
and everything else in a transaction of separate statements. Both must write the same
rows; a user the statement cannot charge falls back to the transaction, which creates
the profile or says why not."""
from __future__ import annotations

import datetime as dt
import threading
import uuid
from typing import Any, Iterator

import psycopg
import pytest

from orchestrator import submission
from orchestrator.db import Database
from orchestrator.errors import InsufficientCredits, RateLimited
from orchestrator.models import Job
from orchestrator.records import iso
from tests.conftest import wipe


@pytest.fixture
def pg(pg_database: str) -> Iterator[Database]:
    db = Database(pg_database)
    wipe(db)
    yield db
    db.dispose()


def _libpq(db: Database) -> str:
    return db.url.replace("postgresql+psycopg://", "postgresql://")


def _rows(db: Database, job: Job) -> dict[str, Any]:
    """Every row the submission wrote, with its own ids and instants replaced by names."""
    asset_table = "videos" if job.video_id else "images"
    asset_id = job.video_id or job.image_id
    with psycopg.connect(_libpq(db), row_factory=psycopg.rows.dict_row) as conn:
        found = {
            "job": conn.execute("SELECT * FROM jobs WHERE id = %s", (job.id,)).fetchone(),
            "asset": conn.execute(f"SELECT * FROM {asset_table} WHERE id = %s",
                                  (asset_id,)).fetchone(),
            "ledger": conn.execute("SELECT * FROM credit_ledger WHERE job_id = %s",
                                   (job.id,)).fetchall(),
            "events": conn.execute("SELECT * FROM job_events WHERE job_id = %s ORDER BY id",
                                   (job.id,)).fetchall(),
        }
    names = {job.id: "<job>", asset_id: "<asset>", str(job.seed): "<seed>",
             iso(job.created_at): "<now>", job.created_at: "<now>"}

    def scrub(value: Any, loose: bool = False) -> Any:
        if isinstance(value, dt.datetime) and loose:
            # The ledger's and the events' own instants: taken as each row is made.
            assert dt.timedelta(0) <= value - job.created_at < dt.timedelta(seconds=5)
            return "<the submission's moment>"
        if isinstance(value, dict):
            return {k: scrub(v, loose) for k, v in value.items()
                    if k not in ("id", "seed", "title")}
        if isinstance(value, list):
            return [scrub(v, loose) for v in value]
        value = str(value) if isinstance(value, uuid.UUID) else value
        try:
            return names.get(value, value)
        except TypeError:  # unhashable
            return value

    scrubbed = {k: scrub(v, loose=k in ('ledger', 'events')) for k, v in found.items()}
    scrubbed["event_ids_ascending"] = [e["id"] for e in found["events"]] == sorted(
        e["id"] for e in found["events"])
    return scrubbed


@pytest.mark.parametrize("job_type,metadata", [
    ("image_fast", {}),
    ("sdxl_image_high", {"negative_prompt": "blurry", "num_images": 2, "seed": 7}),
    ("video_high", {"style": "noir", "nested": {"a": [1, 2.5, None, "é"]}}),
    ("image7b_fast_enhanced", {}),
])
def test_one_statement_writes_what_the_transaction_writes(pg: Database, monkeypatch: Any,
                                                          job_type: str,
                                                          metadata: dict[str, Any]) -> None:
    user = str(uuid.uuid4())
    req = submission.SubmitRequest(job_type=job_type,
                                   metadata={"prompt": "a lighthouse at dusk", **metadata})
    submission.submit_job(pg, user, req, max_attempts=3)  # creates the profile
    seen: list[bool] = []
    real = submission._submit_in_one_statement

    def spy(*args: Any, **kwargs: Any) -> Any:
        got = real(*args, **kwargs)
        seen.append(got is not None)
        return got

    monkeypatch.setattr(submission, "_submit_in_one_statement", spy)
    one = submission.submit_job(pg, user, req, max_attempts=3, max_active=10)
    monkeypatch.setattr(submission, "_submit_in_one_statement", lambda *a, **k: None)
    other = submission.submit_job(pg, user, req, max_attempts=3, max_active=10)
    assert seen == [True]  # the first went through the one statement, and it wrote
    a, b = _rows(pg, one.job), _rows(pg, other.job)
    # The ledger's balance differs by design (the second charge came after the first).
    assert a["ledger"][0].pop("balance_after") == one.balance
    assert b["ledger"][0].pop("balance_after") == other.balance == one.balance - one.spec.credits
    assert a == b, repr([(k, a[k], b[k]) for k in a if a[k] != b[k]])
    assert a["event_ids_ascending"] and [e["type"] for e in a["events"]] == [
        "job.queued", f"{'video' if one.spec.is_video else 'image'}.queued"]
    assert (one.queue_length, other.queue_length) == (2, 3)


def test_a_new_user_is_created_then_charged(pg: Database) -> None:
    user = str(uuid.uuid4())
    got = submission.submit_job(pg, user, submission.SubmitRequest(
        job_type="video_high", metadata={"prompt": "waves"}), max_attempts=3)
    assert got.balance == 100 - got.spec.credits
    with psycopg.connect(_libpq(pg)) as conn:
        assert conn.execute("SELECT token_balance FROM profiles WHERE id = %s",
                            (user,)).fetchone() == (got.balance,)
        assert conn.execute("SELECT count(*) FROM jobs WHERE user_id = %s",
                            (user,)).fetchone() == (1,)


def test_the_statement_writes_nothing_it_cannot_charge(pg: Database) -> None:
    user = str(uuid.uuid4())
    req = submission.SubmitRequest(job_type="sdxl_image_high", metadata={"prompt": "x"})
    submission.submit_job(pg, user, req, max_attempts=3)
    with psycopg.connect(_libpq(pg), autocommit=True) as conn:
        conn.execute("UPDATE profiles SET token_balance = 1 WHERE id = %s", (user,))
        with pytest.raises(InsufficientCredits):
            submission.submit_job(pg, user, req, max_attempts=3)
        with pytest.raises(RateLimited):
            submission.submit_job(pg, user, submission.SubmitRequest(
                job_type="sdxl_image_fast", metadata={"prompt": "x"}), max_attempts=3,
                max_active=1)
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM jobs), (SELECT count(*) FROM images), "
            "(SELECT count(*) FROM credit_ledger), (SELECT count(*) FROM job_events), "
            "(SELECT token_balance FROM profiles WHERE id = %s)", (user,)).fetchone()
    assert counts == (1, 1, 1, 2, 1)


def test_the_statement_waits_for_the_owners_lock(pg: Database) -> None:
    """Events' ids follow commit order per user: the submission locks the profile row
    before anything else, so it waits (writing nothing) while another transaction holds it."""
    user = str(uuid.uuid4())
    req = submission.SubmitRequest(job_type="image_fast", metadata={"prompt": "x"})
    submission.submit_job(pg, user, req, max_attempts=3)
    done = threading.Event()
    with psycopg.connect(_libpq(pg)) as other:
        other.execute("SELECT 1 FROM profiles WHERE id = %s FOR UPDATE", (user,))
        thread = threading.Thread(target=lambda: (
            submission.submit_job(pg, user, req, max_attempts=3), done.set()))
        thread.start()
        assert not done.wait(0.5)
        assert other.execute("SELECT count(*) FROM jobs").fetchone() == (1,)
        other.rollback()
    thread.join(timeout=10)
    assert done.is_set()


def test_queue_length_is_counted_at_most_every_max_age(db: Database, database_url: str) -> None:
    """Between counts a process adds the jobs it queued itself; what other processes queued
    shows at the next count (both databases, both paths)."""
    user = str(uuid.uuid4())
    req = submission.SubmitRequest(job_type="image_fast", metadata={"prompt": "x"})

    def length(database: Database, max_age: float) -> int:
        return submission.submit_job(database, user, req, max_attempts=3,
                                     queue_length_max_age=max_age).queue_length

    assert [length(db, 60), length(db, 60)] == [1, 2]
    other = Database(database_url)  # another web process: its own counts
    try:
        assert length(other, 60) == 3
    finally:
        other.dispose()
    assert length(db, 60) == 3  # not counted again: it has not seen the other's job
    assert length(db, 0) == 5  # counted: 4 waiting before it
    assert length(db, 60) == 6
    assert submission.submit_job(db, user, submission.SubmitRequest(
        job_type="sdxl_image_fast", metadata={"prompt": "x"}), max_attempts=3,
        queue_length_max_age=60).queue_length == 1  # each family its own count
