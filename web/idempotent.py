"""``Idempotency-Key`` on the web side: read the key, replay stored answers."""
from __future__ import annotations

from typing import Any, Callable

from flask import jsonify, request

from orchestrator import idempotency
from orchestrator.errors import Conflict
from orchestrator.idempotency import KeyedRequest, StoredAnswer
from web.services import services

HEADER = "Idempotency-Key"


def request_key(user_id: str) -> KeyedRequest | None:
    return idempotency.keyed(user_id, request.headers.get(HEADER), request.method, request.path,
                             request.get_data(cache=True))


def replay(stored: StoredAnswer) -> Any:
    response = jsonify(stored.body)
    response.status_code = stored.status
    response.headers["Idempotent-Replayed"] = "true"
    return response


def replay_after_race(key: KeyedRequest | None) -> Any:
    """A concurrent request with the same key committed first: answer as it did."""
    stored = idempotency.lookup(services().db, key) if key else None
    if stored is None:
        raise Conflict("A request with this Idempotency-Key is in progress; retry shortly")
    return replay(stored)


def keyed_write(user_id: str, action: Callable[[], tuple[int, dict[str, Any]]]) -> Any:
    """Run a write once per key: replay the stored answer, or run it and store
    its answer (2xx only; errors may be retried with the same key)."""
    svc = services()
    key = request_key(user_id)
    if key is not None and (stored := idempotency.lookup(svc.db, key)) is not None:
        return replay(stored)
    status, body = action()
    if key is not None and 200 <= status < 300:
        try:
            with svc.db.transaction() as session:
                idempotency.store(session, key, status, body)
        except Exception:  # noqa: BLE001 - a concurrent twin stored it first
            return replay_after_race(key)
    response = jsonify(body)
    response.status_code = status
    return response
