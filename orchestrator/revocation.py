"""Token revocation: persisted in the database, cached briefly in each web process.

``orchestrator revoke --session ID`` refuses every token whose ``session_id``
(or ``jti``) is ID; ``orchestrator revoke --user UUID`` refuses every token of
that user issued (``iat``) at or before the revocation, so the user's next
sign-in works. Rows survive restarts; each web process reloads the list when
its copy is older than ``REVOCATION_REFRESH_SECONDS`` (one query per process
per interval, none per request).
"""
from __future__ import annotations

import datetime as dt
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from sqlalchemy import select

from orchestrator.db import Database
from orchestrator.models import Revocation, utcnow

SESSION = "session"
USER = "user"


def revoke(db: Database, kind: str, subject: str, reason: str | None = None) -> dt.datetime:
    """Record a revocation (a repeated ``user`` revocation moves its moment forward)."""
    if kind not in (SESSION, USER):
        raise ValueError(f"unknown revocation kind {kind!r}")
    now = utcnow()
    with db.transaction() as session:
        row = session.execute(select(Revocation).where(
            Revocation.kind == kind, Revocation.subject == subject)).scalar_one_or_none()
        if row is None:
            session.add(Revocation(kind=kind, subject=subject, revoked_at=now, reason=reason))
        else:
            row.revoked_at, row.reason = now, reason
    return now


@dataclass
class RevocationList:
    """The process's copy of the revocation table."""

    db: Database
    refresh_seconds: float
    _sessions: frozenset[str] = frozenset()
    _users: Mapping[str, float] = field(default_factory=dict)
    _loaded_at: float = float("-inf")
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _current(self) -> tuple[frozenset[str], Mapping[str, float]]:
        if time.monotonic() - self._loaded_at >= self.refresh_seconds:
            with self._lock:
                if time.monotonic() - self._loaded_at >= self.refresh_seconds:
                    with self.db.session() as session:
                        rows = session.execute(select(
                            Revocation.kind, Revocation.subject, Revocation.revoked_at)).all()
                    self._sessions = frozenset(s for k, s, _ in rows if k == SESSION)
                    self._users = {s: at.timestamp() for k, s, at in rows if k == USER}
                    self._loaded_at = time.monotonic()
        return self._sessions, self._users

    def is_revoked(self, claims: Mapping[str, Any], user_id: str) -> bool:
        """True if these verified claims (of ``user_id``, canonical) are revoked."""
        sessions, users = self._current()
        for name in ("session_id", "jti"):
            value = claims.get(name)
            if isinstance(value, str) and value in sessions:
                return True
        cutoff = users.get(user_id)
        if cutoff is None:
            return False
        issued = claims.get("iat")
        return not isinstance(issued, (int, float)) or issued <= cutoff
