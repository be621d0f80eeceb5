"""The one error hierarchy of the service.

Every error a caller can cause is an :class:`OrchestratorError`; the web layer
maps each to a JSON body and a status code in one handler, the Celery layer
decides retries from the class alone::

    OrchestratorError                 500 internal
    ├── InvalidRequest                400 invalid_request
    ├── Unauthorized                  401 unauthorized
    ├── InsufficientCredits           402 insufficient_credits
    ├── Forbidden                     403 forbidden
    ├── NotFound                      404 not_found
    ├── Conflict                      409 conflict
    ├── PayloadTooLarge               413 payload_too_large
    ├── Unprocessable                 422 unprocessable
    ├── RateLimited                   429 rate_limited
    ├── ServiceUnavailable            503 unavailable
    └── GenerationError               500 generation_failed  (raised inside workers)
        └── TransientGenerationError  (worth a retry)
"""
from __future__ import annotations

from typing import Any


class OrchestratorError(Exception):
    """Base class: carries a client-safe message, a stable code and a status."""

    status: int = 500
    code: str = "internal"

    def __init__(self, message: str, *, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidRequest(OrchestratorError):
    status = 400
    code = "invalid_request"


class Unauthorized(OrchestratorError):
    status = 401
    code = "unauthorized"


class InsufficientCredits(OrchestratorError):
    status = 402
    code = "insufficient_credits"


class Forbidden(OrchestratorError):
    status = 403
    code = "forbidden"


class NotFound(OrchestratorError):
    status = 404
    code = "not_found"


class Conflict(OrchestratorError):
    status = 409
    code = "conflict"


class PayloadTooLarge(OrchestratorError):
    status = 413
    code = "payload_too_large"


class Unprocessable(OrchestratorError):
    status = 422
    code = "unprocessable"


class RateLimited(OrchestratorError):
    """Too many requests or jobs; ``retry_after`` seconds is a fair time to wait."""

    status = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: int, details: Any = None) -> None:
        super().__init__(message, details=details)
        self.retry_after = retry_after


class ServiceUnavailable(OrchestratorError):
    status = 503
    code = "unavailable"


class GenerationError(OrchestratorError):
    """A generator could not produce the job's files; the job fails."""

    code = "generation_failed"


class TransientGenerationError(GenerationError):
    """A generator error that may succeed on a later try (retried with backoff)."""
