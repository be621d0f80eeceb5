"""``Idempotency-Key``: same key and body → the same answer, and one effect.

Keys are scoped per user and kept ``TTL`` (24 h). A key reused with another
request body is refused (422). Job submission stores its answer in the same
transaction as the job (see ``submission.submit_job``), so a concurrent
duplicate either waits for the first and replays its answer or fails the
unique key and replays it: never two jobs.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from orchestrator.db import Database
from orchestrator.errors import InvalidRequest, Unprocessable
from orchestrator.models import IdempotencyKey, utcnow

TTL = dt.timedelta(hours=24)
MAX_KEY_CHARS = 255


@dataclass(frozen=True)
class KeyedRequest:
    user_id: str
    key: str
    request_hash: str


@dataclass(frozen=True)
class StoredAnswer:
    status: int
    body: dict[str, Any]


def keyed(user_id: str, key: str | None, method: str, path: str, body: bytes) -> KeyedRequest | None:
    """The request's identity under its key, or None when it has no key.

    Raises:
        InvalidRequest: the key is empty, too long or not printable ASCII.
    """
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_KEY_CHARS or not key.isascii() or not key.isprintable():
        raise InvalidRequest(f"Idempotency-Key must be 1 to {MAX_KEY_CHARS} printable ASCII characters",
                             details={"field": "Idempotency-Key"})
    digest = hashlib.sha256(method.encode() + b" " + path.encode() + b"\n" + body).hexdigest()
    return KeyedRequest(user_id, key, digest)


def find(session: Session, req: KeyedRequest) -> StoredAnswer | None:
    """The stored answer for this key, if any (and still fresh).

    Raises:
        Unprocessable: the key was used with a different request.
    """
    row = session.execute(select(IdempotencyKey).where(
        IdempotencyKey.user_id == req.user_id, IdempotencyKey.key == req.key,
        IdempotencyKey.created_at > utcnow() - TTL)).scalar_one_or_none()
    if row is None:
        return None
    if row.request_hash != req.request_hash:
        raise Unprocessable("Idempotency-Key was already used with a different request",
                            details={"field": "Idempotency-Key"})
    return StoredAnswer(row.status_code, json.loads(row.response))


def lookup(db: Database, req: KeyedRequest) -> StoredAnswer | None:
    with db.session() as session:
        return find(session, req)


def store(session: Session, req: KeyedRequest, status: int, body: dict[str, Any],
          job_id: str | None = None) -> None:
    """Record the answer (in the caller's transaction). A stale row of the same
    key is replaced; a concurrent one makes the unique key fail the transaction."""
    session.execute(delete(IdempotencyKey).where(
        IdempotencyKey.user_id == req.user_id, IdempotencyKey.key == req.key,
        IdempotencyKey.created_at <= utcnow() - TTL))
    session.add(IdempotencyKey(user_id=req.user_id, key=req.key, request_hash=req.request_hash,
                               job_id=job_id, status_code=status,
                               response=json.dumps(body, separators=(",", ":")),
                               created_at=utcnow()))
    session.flush()


def purge(db: Database) -> int:
    """Drop keys older than the TTL (the reconciler calls this)."""
    with db.transaction() as session:
        result = session.execute(delete(IdempotencyKey).where(
            IdempotencyKey.created_at <= utcnow() - TTL))
        return result.rowcount or 0
