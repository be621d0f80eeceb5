"""The Celery processes' log lines (worker and beat), in ``LOG_FORMAT``.

Celery sets its handlers up as usual; with ``LOG_FORMAT=json`` (the default)
each gets the JSON formatter of ``orchestrator.logs`` and the startup banner
(printed, not logged) becomes one log line. Every line logged while a task
runs carries its ``task_id``, and a generation task's lines its ``job_id`` (the
task's argument, which is also its task id); so do Celery's own lines about a
task ("received", "succeeded") logged by the parent process.
``LOG_FORMAT=text`` leaves Celery's own format alone.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Mapping

from celery import signals
from celery._state import get_current_task
from celery.utils.log import get_multiprocessing_logger

from orchestrator import logs
from orchestrator.config import get_settings
from tasks.routing import GENERATION_TASK

log = logging.getLogger(__name__)


def task_context(record: logging.LogRecord) -> dict[str, Any]:
    task = get_current_task()
    request = getattr(task, "request", None) if task is not None else None
    if request is not None and request.id:
        found = {"task_id": request.id}
        if task.name == GENERATION_TASK and request.args:
            found["job_id"] = request.args[0]
        return found
    args = record.args
    if isinstance(args, Mapping) and "id" in args and "name" in args:
        # Celery's own lines about a task pass its id and name as the format's arguments.
        found = {"task_id": args["id"]}
        if args["name"] == GENERATION_TASK:
            found["job_id"] = args["id"]  # published with the job id as task id
        return found
    return {}


def _json() -> bool:
    return get_settings().log_format == "json"


@signals.celeryd_init.connect
def _worker_logging(**_: Any) -> None:
    """A worker, before anything logs or warns: our handler on the root logger
    (Celery keeps a root logger that already has one)."""
    logs.add_context(task_context)
    if _json():
        logs.configure("json", logging.INFO)
        _say_in_json()


def _say_in_json() -> None:
    """Celery prints a few notices from signal handlers ("Warm shutdown") with a raw
    write, not logging (a signal handler must not take the logging locks). Keep the
    raw write; make what it writes a JSON line."""
    from celery.apps import worker as worker_app

    if not callable(getattr(worker_app, "safe_say", None)):
        return
    write = getattr(worker_app, "_original_os_write", os.write)

    def say(msg: str, f: Any = sys.__stderr__) -> None:
        if hasattr(f, "fileno") and f.fileno() is not None:
            try:
                write(f.fileno(), (logs.json_line("INFO", "celery.apps.worker", str(msg).strip())
                                   + "\n").encode())
            except OSError:
                pass

    worker_app.safe_say = say


@signals.after_setup_logger.connect
def _root_logger(logger: logging.Logger | None = None, **_: Any) -> None:
    logs.add_context(task_context)
    if logger is None or not _json():
        return
    logs.reformat(logger, "json")
    logs.reformat(get_multiprocessing_logger(), "json")
    logging.captureWarnings(True)


@signals.after_setup_task_logger.connect
def _task_logger(logger: logging.Logger | None = None, **_: Any) -> None:
    if logger is not None and _json():
        logs.reformat(logger, "json")


@signals.celeryd_after_setup.connect
def _one_line_banner(sender: Any = None, instance: Any = None, **_: Any) -> None:
    """The worker's startup banner is printed art; in JSON mode it is one line instead."""
    if instance is None or not _json():
        return
    instance.quiet = True
    queues = sorted(instance.app.amqp.queues.consume_from or ())
    log.info("worker %s starting: queues %s, concurrency %s, pool %s", sender, ",".join(queues),
             instance.concurrency, getattr(instance.pool_cls, "__module__", instance.pool_cls))
