"""Every error becomes JSON here, in one place: ``{success: false, error, code, details?}``.

Clients never see a stack trace, SQL or a file path: unexpected errors are
logged with the request id and answered with a generic 500.
"""
from __future__ import annotations

import logging
from typing import Any

from flask import Flask, g, jsonify, request
from pydantic import ValidationError
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from werkzeug.exceptions import HTTPException

from orchestrator.errors import OrchestratorError, RateLimited

log = logging.getLogger(__name__)


def error_response(status: int, message: str, code: str, details: Any = None):  # type: ignore[no-untyped-def]
    body: dict[str, Any] = {"success": False, "error": message, "code": code}
    if details is not None:
        body["details"] = details
    return jsonify(body), status


def validation_details(exc: ValidationError) -> list[dict[str, Any]]:
    """Field paths and messages, never the rejected input itself."""
    return [{"field": ".".join(str(p) for p in e["loc"]) or "body", "message": e["msg"]}
            for e in exc.errors(include_url=False, include_input=False)]


def init_app(app: Flask) -> None:
    @app.errorhandler(OrchestratorError)
    def _domain(exc: OrchestratorError):  # type: ignore[no-untyped-def]
        # The path only: a query string may carry a link signature or a misplaced token.
        log.info("%s %s refused %s %s: %s (request %s)", request.method, request.path,
                 exc.status, exc.code, exc.message, g.get("request_id"))
        response, status = error_response(exc.status, exc.message, exc.code, exc.details)
        if isinstance(exc, RateLimited):
            response.headers["Retry-After"] = str(exc.retry_after)
        return response, status

    @app.errorhandler(ValidationError)
    def _invalid(exc: ValidationError):  # type: ignore[no-untyped-def]
        details = validation_details(exc)
        first = details[0]["field"] if details else "body"
        return error_response(400, f"Invalid request: {first}", "invalid_request", details)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):  # type: ignore[no-untyped-def]
        code = (exc.name or "error").lower().replace(" ", "_")
        response, status = error_response(exc.code or 500, exc.description or exc.name, code)
        # Werkzeug's own headers mean something (Allow of a 405, Content-Range of a 416,
        # WWW-Authenticate): keep them, only the body's type and length are ours.
        for name, value in exc.get_headers():
            if name.lower() not in ("content-type", "content-length"):
                response.headers.add(name, value)
        return response, status

    @app.errorhandler(DataError)
    def _bad_data(exc: DBAPIError):  # type: ignore[no-untyped-def]
        log.warning("database refused a value (request %s): %s", g.get("request_id"),
                    type(exc.orig).__name__)
        return error_response(400, "The request contains a value that cannot be stored",
                              "invalid_request")

    @app.errorhandler(OperationalError)
    def _db_down(exc: DBAPIError):  # type: ignore[no-untyped-def]
        log.error("database unavailable (request %s): %s", g.get("request_id"), type(exc.orig).__name__)
        return error_response(503, "The database is unavailable; try again shortly", "unavailable")

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):  # type: ignore[no-untyped-def]
        log.exception("unhandled error (request %s)", g.get("request_id"))
        return error_response(500, "Internal server error", "internal")
