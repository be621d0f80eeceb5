"""Queues and routing, in one place.

A job's family names its queue; the job type sets its time limits. The web
process publishes with :func:`route_for`; workers consume with ``-Q``; a
structural test checks that every queue here is consumed by a Procfile process.
"""
from __future__ import annotations

from typing import Any

from kombu import Exchange, Queue

from orchestrator.jobtypes import Family, JobType


class QueueNames:
    SDXL = Family.SDXL.value
    WAN = Family.WAN.value
    #: Housekeeping (the reconciler): never behind a GPU job.
    MAINTENANCE = "maintenance"

    @classmethod
    def all(cls) -> tuple[str, ...]:
        return (cls.SDXL, cls.WAN, cls.MAINTENANCE)


GENERATION_TASK = "generation.run"
RECONCILE_TASK = "maintenance.reconcile"

QUEUES = tuple(Queue(name, Exchange(name, type="direct"), routing_key=name)
               for name in QueueNames.all())


def route_for(spec: JobType) -> dict[str, Any]:
    """``apply_async`` options for a job of this type: its queue and time limits.

    Only the queue is named, so Celery publishes through the anonymous direct
    exchange straight to the queue: on Redis that needs no binding table, and
    a flushed or restarted Redis cannot make later messages vanish.
    """
    return {
        "queue": spec.family.value,
        "soft_time_limit": spec.soft_time_limit,
        "time_limit": spec.hard_time_limit,
    }
