"""``Idempotency-Key`` on the web side: read the key, replay stored answers.

The same store de-duplicates signed worker callbacks by ``webhook-id``
(Standard Webhooks): a redelivered message is answered as the first time,
without effect; the same id with another body is refused (409).
"""
from __future__ import annotations

import uuid
from typing import Any, Callable

from flask import jsonify, request

from orchestrator import idempotency
from orchestrator.errors import Conflict, InvalidRequest, Unprocessable
from orchestrator.idempotency import KeyedRequest, StoredAnswer
from web.services import services

HEADER = "Idempotency-Key"
#: The owner under which webhook ids are stored (no user has this id).
WEBHOOK_SCOPE = str(uuid.uuid5(uuid.NAMESPACE_URL, "orchestrator:webhook-id"))


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
    return once(request_key(user_id), action)


def once_per_webhook_id(webhook_id: str | None, action: Callable[[], tuple[int, dict[str, Any]]]) -> Any:
    """Run a signed callback once per ``webhook-id`` (unsigned ones: every time)."""
    if webhook_id is None:
        status, body = action()
        return jsonify(body), status
    try:
        key = idempotency.keyed(WEBHOOK_SCOPE, webhook_id, request.method, request.path,
                                request.get_data(cache=True))
    except InvalidRequest:
        raise InvalidRequest("webhook-id must be 1 to 255 printable ASCII characters",
                             details={"field": "webhook-id"}) from None
    try:
        return once(key, action)
    except Unprocessable:
        raise Conflict("This webhook-id was already delivered with a different body",
                       details={"field": "webhook-id"}) from None


def once(key: KeyedRequest | None, action: Callable[[], tuple[int, dict[str, Any]]]) -> Any:
    svc = services()
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
