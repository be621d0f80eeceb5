"""Housekeeping tasks, on the ``maintenance`` queue (scheduled by beat)."""
from __future__ import annotations

from typing import Any

from orchestrator import reconciler
from tasks.celery_app import celery_app
from tasks.publish import publish_job
from tasks.routing import RECONCILE_TASK
from tasks.runtime import runtime


@celery_app.task(name=RECONCILE_TASK, ignore_result=True)
def reconcile() -> dict[str, Any]:
    """One reconciliation pass (see ``orchestrator.reconciler``)."""
    rt = runtime()
    return reconciler.reconcile(rt.db, rt.settings, publish_job).as_dict()
