"""Fault injection for the fault tests: off unless ``ORCHESTRATOR_FAULTS=1``
(refused in production). A job opts in with ``metadata.fault``:

- ``crash_worker``: the worker process dies (SIGKILL) when it starts the job;
- ``crash_worker_once``: the same, on the first attempt only;
- ``transient:N``: the generator raises a transient error on the first N attempts;
- ``crash_before_publish``: the web process dies after committing the job,
  before publishing it.
"""
from __future__ import annotations

import os
import signal
from typing import Any

from orchestrator.config import Settings
from orchestrator.errors import TransientGenerationError


def _fault(settings: Settings, metadata: dict[str, Any] | None) -> str:
    if not settings.faults or not metadata:
        return ""
    value = metadata.get("fault")
    return value if isinstance(value, str) else ""


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def at_job_start(settings: Settings, metadata: dict[str, Any] | None, attempt: int) -> None:
    fault = _fault(settings, metadata)
    if fault == "crash_worker" or (fault == "crash_worker_once" and attempt == 1):
        _die()
    if fault.startswith("transient:") and attempt <= int(fault.split(":", 1)[1] or 0):
        raise TransientGenerationError(f"injected transient failure (attempt {attempt})")


def before_publish(settings: Settings, metadata: dict[str, Any] | None) -> None:
    if _fault(settings, metadata) == "crash_before_publish":
        _die()
