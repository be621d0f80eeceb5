"""The round-trip budget of the hot path: how many SQL statements one
queue-job request sends. Raising a budget must be a deliberate change."""
from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import event

# Round trips per request for a returning user (profile exists), statements
# plus COMMITs, all in one transaction: debit (UPDATE … RETURNING the balance, the
# user's active jobs, the family's queue length and, on PostgreSQL, the NOTIFY of
# the job's events), INSERT image, INSERT job, INSERT ledger, INSERT events (one
# executemany), COMMIT. SQLite also sends its explicit BEGIN IMMEDIATE as a
# statement. The dispatch mark after publishing is batched by another thread
# (orchestrator.dispatch_marks), so it is not this request's round trip.
QUEUE_JOB_BUDGET = {"postgresql": 6, "sqlite": 7}


def _count(app: Any) -> tuple[list[str], Any]:
    engine = app.extensions["orchestrator"].db.engine
    seen: list[str] = []
    me = threading.get_ident()  # this request's statements, not the dispatch-mark thread's

    def on_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if threading.get_ident() == me:
            seen.append(statement.split(None, 1)[0].upper())

    def on_commit(conn: Any) -> None:
        if threading.get_ident() == me:
            seen.append("COMMIT")

    event.listen(engine, "before_cursor_execute", on_execute)
    event.listen(engine, "commit", on_commit)

    def stop() -> None:
        event.remove(engine, "before_cursor_execute", on_execute)
        event.remove(engine, "commit", on_commit)

    return seen, stop


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
    assert statements.count("COMMIT") == 1, statements  # one transaction
    assert "SELECT" not in statements, statements  # nothing read that a write could return
