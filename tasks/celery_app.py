"""The Celery app, ``tasks.celery_app:celery_app``.

The app object exists at import (the ``celery -A`` CLI needs it), but it reads
no configuration until first used: ``on_configure`` fills it from the
service settings then.
"""
from __future__ import annotations

from typing import Any

from celery import Celery

from orchestrator.config import get_settings
from tasks import logs as _logs  # noqa: F401 - its logging signals must be connected before a worker starts
from tasks.config import celery_config

celery_app = Celery("orchestrator", include=["tasks.generation", "tasks.signals", "tasks.heartbeat", "tasks.maintenance"])


@celery_app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    sender.conf.update(celery_config(get_settings()))
