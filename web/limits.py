"""Rate limits on job submission (flask-limiter), per authenticated user.

``SUBMIT_RATE_LIMIT`` (default ``30/minute;5/second``) is one budget shared by
every route that creates a run (queue-job, POST /v1/jobs, retry, the admin
image), counted per user id, in Redis when ``REDIS_URL`` is set (all web
processes share it) and in process memory otherwise. The per-user cap on
queued+processing jobs (``MAX_ACTIVE_JOBS``) is enforced by the database in the
submitting transaction (``orchestrator.credits.debit``), not here.

A limiter store that is down never fails a request: flask-limiter falls back
to per-process in-memory counters with the same limits (logged as a warning)
and returns to Redis when it answers again.
"""
from __future__ import annotations

import functools
import logging
import math
import time
from typing import Any, Callable, TypeVar

from flask import Flask, current_app, g, request
from flask_limiter import Limiter
from flask_limiter.errors import RateLimitExceeded

from web.errors import error_response

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


def _user_key() -> str:
    # Submission routes authenticate before the limit is checked (the decorator
    # sits under @user_required), so the key is the user, not an address.
    return f"user:{g.get('user_id') or request.remote_addr}"


def _submit_limit() -> str:
    return current_app.extensions["orchestrator"].settings.submit_rate_limit or "1000000/second"


def _unlimited() -> bool:
    return not current_app.extensions["orchestrator"].settings.submit_rate_limit


def _new_limiter() -> Limiter:
    return Limiter(
        key_func=_user_key,
        strategy="moving-window",
        headers_enabled=False,  # Retry-After goes on the 429 only (below), not on every answer
        in_memory_fallback_enabled=True,
        swallow_errors=True,
        key_prefix="orchestrator",
    )


def submission_limit(view: F) -> F:
    """Decorate every view that creates a run, *under* its authentication decorator."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with current_app.extensions["submission_limit"]:
            return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def init_app(app: Flask) -> None:
    """One limiter per app (its own store and fallback state)."""
    settings = app.extensions["orchestrator"].settings
    app.config.update(
        RATELIMIT_STORAGE_URI=settings.redis_url or "memory://",
        RATELIMIT_STORAGE_OPTIONS={"socket_connect_timeout": 0.5, "socket_timeout": 0.5}
        if settings.redis_url else {},
    )
    limiter = _new_limiter()
    limiter.init_app(app)
    app.extensions["submission_limit"] = limiter.shared_limit(
        _submit_limit, scope="job-submission", key_func=_user_key, exempt_when=_unlimited,
        error_message="Too many job submissions; slow down")

    @app.errorhandler(RateLimitExceeded)
    def _limited(exc: RateLimitExceeded) -> Any:
        response, status = error_response(429, exc.description or "Too many requests",
                                           "rate_limited", {"limit": str(exc.limit.limit)})
        response.headers["Retry-After"] = str(_seconds_to_reset(limiter))
        return response, status


def _seconds_to_reset(limiter: Limiter) -> int:
    """Whole seconds until the breached window lets one more request through."""
    try:
        current = limiter.current_limit
        if current is not None:
            return max(1, math.ceil(current.reset_at - time.time()))
    except Exception as e:  # noqa: BLE001 - the store went away between check and answer
        log.warning("rate limit store unavailable while computing Retry-After (%s)", type(e).__name__)
    return 1
