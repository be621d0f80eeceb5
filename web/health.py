"""Liveness and readiness."""
from __future__ import annotations

import os
from typing import Any

from flask import Blueprint, jsonify
from sqlalchemy import text

from web.openapi import Reply, spec
from web.schemas import HealthAnswer, ReadyAnswer
from web.services import services

bp = Blueprint("health", __name__)


@bp.get("/healthz")
@spec(summary="The process is alive", tags=["meta"], responses={200: HealthAnswer})
def healthz() -> Any:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
@spec(summary="Database, broker and storage reachable", tags=["meta"], responses={
    200: ReadyAnswer, 503: Reply(ReadyAnswer, "Not ready: `checks` names what is down")})
def readyz() -> Any:
    """Database, broker and storage reachable: 200, else 503 naming what is down."""
    svc = services()
    checks: dict[str, str] = {}
    try:
        with svc.db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as e:  # noqa: BLE001 - any failure means not ready
        checks["database"] = f"down ({type(e).__name__})"
    root = svc.settings.storage_root
    checks["storage"] = "ok" if root.is_dir() and os.access(root, os.W_OK) else "down"
    try:
        from tasks.publish import broker_ready

        broker_ready(timeout=1.0)
        checks["broker"] = "ok"
    except Exception as e:  # noqa: BLE001
        checks["broker"] = f"down ({type(e).__name__})"
    ready = all(v == "ok" for v in checks.values())
    return jsonify({"status": "ready" if ready else "unavailable", "checks": checks}), (
        200 if ready else 503)
