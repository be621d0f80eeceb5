"""The web's log context: each line logged while a request runs carries its
``request_id`` (``web.security``), the authenticated ``user_id`` and the
``job_id`` it is about; access lines carry the request's id from its answer.
The format itself is ``orchestrator.logs`` (set up by ``web/gunicorn_conf.py``).
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

from flask import Flask, g, has_request_context, request

from orchestrator import logs
from orchestrator.queries import canonical_uuid


def request_context(_record: logging.LogRecord) -> dict[str, Any]:
    if not has_request_context():
        return {}
    job_id = g.get("job_id") or canonical_uuid((request.view_args or {}).get("job_id"))
    return {"request_id": g.get("request_id"), "user_id": g.get("user_id"), "job_id": job_id}


def access_context(record: logging.LogRecord) -> dict[str, Any]:
    """gunicorn's access lines: their atoms as fields (never the query string or headers)."""
    atoms = record.args
    if record.name != "gunicorn.access" or not isinstance(atoms, Mapping):
        return {}
    return {"request_id": atoms["{x-request-id}o"], "method": atoms["m"], "path": atoms["U"],
            "status": atoms["s"], "bytes": atoms["B"], "duration_ms": atoms["M"],
            "remote_addr": atoms["h"]}


def init_app(_app: Flask) -> None:
    logs.add_context(request_context)
