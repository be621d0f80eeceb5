"""Publishing a committed job to its family's queue (the web's one use of Celery)."""
from __future__ import annotations

from orchestrator.jobtypes import JOB_TYPES
from tasks.generation import run_generation
from tasks.routing import route_for

#: Bounded publish retries: a request never hangs on a dead broker.
RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}


def publish_job(job_id: str, job_type: str) -> None:
    """Send ``generation.run(job_id)`` with the job id as task id.

    Raises:
        Exception: whatever kombu raises when the broker cannot take it.
    """
    run_generation.apply_async(args=(job_id,), task_id=job_id, retry=True,
                               retry_policy=RETRY_POLICY, **route_for(JOB_TYPES[job_type]))


def broker_ready(timeout: float = 1.0) -> None:
    """Raise unless the broker accepts a connection within ``timeout`` seconds."""
    with run_generation.app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=timeout)
