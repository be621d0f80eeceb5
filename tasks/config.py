"""Celery settings, built once from the service settings (lowercase Celery names).

The long-task settings of DESIGN.md: late acks, requeue when a worker dies,
prefetch one, started state tracked, and a visibility timeout above the
longest hard time limit wherever Celery reads one.
"""
from __future__ import annotations

from typing import Any

from orchestrator.config import ConfigurationError, Settings
from orchestrator.jobtypes import LONGEST_HARD_TIME_LIMIT
from tasks.routing import QUEUES, RECONCILE_TASK, QueueNames

#: Seconds a reserved-but-unacked Redis message stays invisible before
#: redelivery: above the longest hard time limit, or a long job would be
#: delivered twice while it still runs.
VISIBILITY_TIMEOUT = LONGEST_HARD_TIME_LIMIT + 600


def _uses_visibility_timeout(url: str) -> bool:
    return url.split("://", 1)[0] in {"redis", "rediss", "sqs", "sentinel"}


def celery_config(settings: Settings) -> dict[str, Any]:
    broker = settings.broker_url
    conf: dict[str, Any] = dict(
        broker_url=broker,
        result_backend=settings.result_backend,
        task_queues=QUEUES,
        task_default_queue=QueueNames.SDXL,
        task_create_missing_queues=False,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        enable_utc=True,
        timezone="UTC",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_track_started=True,
        worker_prefetch_multiplier=1,
        result_expires=24 * 3600,
        # Job state lives in the database; Celery's results are never read.
        task_ignore_result=True,
        worker_send_task_events=settings.worker_task_events,
        task_send_sent_event=settings.task_sent_events,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=settings.publish_timeout,
        worker_hijack_root_logger=False,
        # Model backends load their weights in worker_process_init (minutes for
        # real checkpoints); Celery must not kill a child that is still loading.
        worker_proc_alive_timeout=(4.0 if (settings.sdxl_backend, settings.wan_backend,
                                           settings.enhancer_backend)
                                   == ("procedural", "procedural", "rules") else 900.0),
        task_routes={RECONCILE_TASK: {"queue": QueueNames.MAINTENANCE}},
        beat_schedule={
            "reconcile": {
                "task": RECONCILE_TASK,
                "schedule": settings.reconcile_interval,
                # A pass that could not run in time is replaced by the next one.
                "options": {"queue": QueueNames.MAINTENANCE, "expires": settings.reconcile_interval},
            },
        },
    )
    if _uses_visibility_timeout(broker):
        conf["broker_transport_options"] = {"visibility_timeout": VISIBILITY_TIMEOUT}
    if broker.startswith("redis"):
        # A Redis that accepts connections but stops answering must not hang
        # a web request: bounded connect and socket timeouts on the broker.
        conf["broker_transport_options"].update(
            socket_connect_timeout=settings.publish_timeout, socket_timeout=5,
            retry_on_timeout=True)
        conf["redis_socket_connect_timeout"] = settings.publish_timeout
        conf["redis_socket_timeout"] = 5
        # kombu's Redis transport with one client per channel (tasks.redis_transport).
        conf["broker_transport"] = "tasks.redis_transport:Transport"
    if _uses_visibility_timeout(settings.result_backend):
        conf["result_backend_transport_options"] = {"visibility_timeout": VISIBILITY_TIMEOUT}
    if broker.startswith("sqla+sqlite"):
        # kombu passes transport options to create_engine: wait on a busy
        # SQLite file instead of failing, since web and workers share it.
        conf["broker_transport_options"] = {"connect_args": {"timeout": 30}}
    check_consistency(conf)
    return conf


def check_consistency(conf: dict[str, Any]) -> None:
    """Refuse settings under which a long job would run twice or never be acked.

    Raises:
        ConfigurationError: a rule of DESIGN.md is broken.
    """
    problems = []
    if not conf.get("task_acks_late") or not conf.get("task_reject_on_worker_lost"):
        problems.append("task_acks_late and task_reject_on_worker_lost must be on")
    if conf.get("worker_prefetch_multiplier") != 1:
        problems.append("worker_prefetch_multiplier must be 1")
    for key in ("broker", "result_backend"):
        url = conf.get("broker_url" if key == "broker" else "result_backend", "")
        if _uses_visibility_timeout(url):
            opts = conf.get(f"{key}_transport_options") or {}
            vt = opts.get("visibility_timeout")
            if vt is None or vt <= LONGEST_HARD_TIME_LIMIT:
                problems.append(f"{key}_transport_options.visibility_timeout must exceed "
                                f"the longest hard time limit ({LONGEST_HARD_TIME_LIMIT} s)")
    if problems:
        raise ConfigurationError("inconsistent Celery settings: " + "; ".join(problems))
