"""Celery signals → ``orchestrator.completion``: the in-house door to completion.

The task returns what it made; these handlers record it. Each handler is
fenced by the attempt the task claimed, so a duplicate or stale delivery
changes nothing.
"""
from __future__ import annotations

import logging
import socket
import time
from typing import Any, Callable, TypeVar

from celery import signals
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from sqlalchemy.exc import DBAPIError

from orchestrator import completion
from orchestrator.errors import OrchestratorError
from orchestrator.status import JobStatus
from tasks import runtime as rt_module
from tasks.routing import GENERATION_TASK

log = logging.getLogger(__name__)

T = TypeVar("T")
DB_RETRY_LIMIT_S = 15 * 60


def _until_recorded(action: Callable[[], T], what: str) -> T | None:
    """Run a completion write, retrying while the database is down.

    The files are already stored; losing the write would leave the job to the
    reconciler (a second, needless run). The handlers run inside the task's
    hard time limit, so an outage longer than what is left of it ends the
    process first; either way (or after ``DB_RETRY_LIMIT_S``) the lease
    expires and the reconciler runs the job again.
    """
    deadline = time.monotonic() + DB_RETRY_LIMIT_S
    delay = 0.5
    while True:
        try:
            return action()
        except DBAPIError as e:
            if time.monotonic() + delay > deadline:
                log.error("gave up recording %s: database unavailable", what)
                return None
            log.warning("recording %s failed (%s); retrying in %.1fs", what, type(e).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _ours(sender: Any) -> bool:
    return getattr(sender, "name", sender) == GENERATION_TASK


def _client_message(exc: BaseException | None) -> str:
    """What the user may read about a failure: never a trace, path or secret."""
    if isinstance(exc, OrchestratorError):
        return exc.message
    if isinstance(exc, (SoftTimeLimitExceeded, TimeLimitExceeded)):
        return "generation timed out"
    return f"generation failed ({type(exc).__name__})" if exc else "generation failed"


@signals.worker_process_init.connect
def _fresh_process(**_: Any) -> None:
    rt_module.reset()
    _load_models()


def _load_models() -> None:
    """Model backends load here, once per worker process, not per job."""
    settings = rt_module.runtime().settings
    if (settings.sdxl_backend, settings.wan_backend, settings.enhancer_backend) == (
            "procedural", "procedural", "rules"):
        return
    from tasks.celery_app import celery_app

    queues = set(celery_app.amqp.queues.consume_from or ()) or None
    if queues is not None and not queues & {"sdxl", "wan"}:
        return
    rt_module.preload(queues)


@signals.task_success.connect
def on_success(sender: Any = None, result: Any = None, **_: Any) -> None:
    if not _ours(sender) or not isinstance(result, dict):
        return
    job_id = result.get("job_id")
    rt_module.CLAIMED.pop(sender.request.id, None)
    if result.get("skipped") or result.get("aborted") or job_id is None:
        return
    outcome = completion.Outcome(
        JobStatus.COMPLETED, attempt=result["attempt"], assets=result.get("assets") or [],
        thumbnail=result.get("thumbnail"), enhanced_prompt=result.get("enhanced_prompt"),
        metadata=result.get("metadata") or {})
    done = _until_recorded(lambda: completion.finish_job(rt_module.runtime().db, job_id, outcome),
                           f"completion of job {job_id}")
    log.info("job %s attempt %s completed (changed=%s)", job_id, result["attempt"],
             done.changed if done else None)


@signals.task_failure.connect
def on_failure(sender: Any = None, task_id: str | None = None, exception: BaseException | None = None,
               **_: Any) -> None:
    if not _ours(sender) or task_id is None:
        return
    attempt = rt_module.CLAIMED.pop(task_id, None)
    if attempt is None:
        if isinstance(exception, TimeLimitExceeded):
            # The pool killed a child past its hard limit; this runs in the
            # parent. Fail the run this host holds, not a later one elsewhere.
            _until_recorded(lambda: completion.fail_timed_out(
                rt_module.runtime().db, task_id, host=socket.gethostname()),
                f"timeout of job {task_id}")
            return
        # Failed before claiming its job (e.g. the database was down): the
        # job is untouched; the reconciler offers it again.
        log.warning("task %s failed before claiming its job: %r", task_id, exception)
        return
    outcome = completion.Outcome(JobStatus.FAILED, attempt=attempt, error=_client_message(exception))
    _until_recorded(lambda: completion.finish_job(rt_module.runtime().db, task_id, outcome),
                    f"failure of job {task_id}")
    log.info("job %s attempt %s failed: %s", task_id, attempt, outcome.error)


@signals.task_retry.connect
def on_retry(sender: Any = None, request: Any = None, reason: Any = None, **_: Any) -> None:
    if not _ours(sender) or request is None:
        return
    attempt = rt_module.CLAIMED.pop(request.id, None)
    if attempt is not None:
        message = _client_message(getattr(reason, "exc", None))
        _until_recorded(lambda: completion.requeue_for_retry(rt_module.runtime().db, request.id,
                                                             attempt, message),
                        f"retry of job {request.id}")


@signals.task_revoked.connect
def on_revoked(sender: Any = None, request: Any = None, terminated: bool = False, **_: Any) -> None:
    """An operator revoked the task (Flower, ``celery control revoke``): cancel the job."""
    if not _ours(sender) or request is None:
        return
    attempt = rt_module.CLAIMED.pop(request.id, None)
    completion.finish_job(rt_module.runtime().db, request.id, completion.Outcome(
        JobStatus.CANCELLED, attempt=attempt, error="revoked by operator"))
