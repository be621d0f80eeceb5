"""Prometheus metrics of the job lifecycle, shared by every process.

The web's gunicorn workers and the Celery worker processes each count the
transitions they commit. Under the Procfile they all run with
``PROMETHEUS_MULTIPROC_DIR`` (default ``<VAR_DIR>/metrics``): prometheus_client
then keeps each process's values in memory-mapped files there, and the web's
``GET /metrics`` (``web.metrics``) adds them up. Without the variable (one
process: tests, a shell) the values live in this process's default registry.

Each counter is bumped right after the transaction that decided its
transition committed, by the function that ran it (``submission.submit_job``
and ``retry_job``; ``completion.start_job``, ``report_processing`` and
``finish_job``), and only when its compare-and-set won: a duplicate delivery
or a late callback changes nothing and counts nothing. Queue depths are not
counted at all: :class:`QueueCollector` reads them from the database at each
scrape, so they are right whichever process changed what.
"""
from __future__ import annotations

import datetime as dt
import functools
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from orchestrator.db import Database
from orchestrator.models import Job
from orchestrator.status import JobStatus

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

#: prometheus_client's own variable; it reads it when it is first imported.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600,
                7200, 21600)
RUN_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 240, 300, 450, 600, 900, 1800,
               3600)


def multiprocess_dir() -> Path | None:
    """The shared directory this process writes its values to (None: in-process only)."""
    raw = os.environ.get(MULTIPROC_ENV) or os.environ.get(MULTIPROC_ENV.lower())
    return Path(raw) if raw else None


_dir = multiprocess_dir()
if _dir is not None:
    # A worker may start before the web process that clears the directory.
    _dir.mkdir(parents=True, exist_ok=True)

JOBS_CREATED = Counter("orchestrator_jobs_created", "Jobs accepted (each user retry counts again)",
                       ["job_type"])
JOBS_FINISHED = Counter("orchestrator_jobs_finished",
                        "Jobs that reached a terminal state (completed, failed, cancelled)",
                        ["job_type", "status"])
QUEUE_WAIT = Histogram("orchestrator_job_queue_wait_seconds",
                       "Time from queued to started, observed at each start", ["job_type"],
                       buckets=WAIT_BUCKETS)
RUN_TIME = Histogram("orchestrator_job_run_seconds",
                     "Time from started to completed, of completed jobs", ["job_type"],
                     buckets=RUN_BUCKETS)
#: Set by a worker process once it has loaded a model backend (tasks.runtime.preload).
MODEL_PARAMETERS = Gauge("orchestrator_model_parameters",
                         "Parameters of a model a live worker process holds warm",
                         ["family", "backend", "device", "dtype"], multiprocess_mode="liveall")
MODEL_MEMORY = Gauge("orchestrator_model_memory_bytes",
                     "Memory after loading the model (GPU allocated/peak, or the process's peak RSS)",
                     ["family", "device", "kind"], multiprocess_mode="liveall")


def _never_raises(fn: F) -> F:
    """A metric is bumped after a commit: failing then would report an error for a
    change that happened. Log it instead."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - metrics never fail a transition
            log.warning("metric %s not recorded (%s: %s)", fn.__name__, type(e).__name__, e)

    return wrapper  # type: ignore[return-value]


def _seconds(start: dt.datetime | None, end: dt.datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return max(0.0, (end - start).total_seconds())


@_never_raises
def job_created(job_type: str) -> None:
    """A submission (or a user's retry of a failed job) committed."""
    JOBS_CREATED.labels(job_type=job_type).inc()


@_never_raises
def job_started(job: Job, at: dt.datetime) -> None:
    """A claim ``queued → processing`` committed at ``at``."""
    wait = _seconds(job.queued_at, at)
    if wait is not None:
        QUEUE_WAIT.labels(job_type=job.job_type).observe(wait)


@_never_raises
def job_finished(job: Job) -> None:
    """A terminal transition committed (``job`` is the row it wrote)."""
    JOBS_FINISHED.labels(job_type=job.job_type, status=job.status).inc()
    if job.status == JobStatus.COMPLETED.value:
        run = _seconds(job.started_at, job.completed_at)
        if run is not None:
            RUN_TIME.labels(job_type=job.job_type).observe(run)


@_never_raises
def model_loaded(info: dict[str, Any]) -> None:
    """A worker process loaded a model: what it is, where, and the memory it took."""
    family, device = str(info.get("family")), str(info.get("device"))
    MODEL_PARAMETERS.labels(family=family, backend=str(info.get("backend")), device=device,
                            dtype=str(info.get("dtype"))).set(float(info.get("parameters") or 0))
    for key, value in info.items():
        if key.endswith("_bytes"):
            MODEL_MEMORY.labels(family=family, device=device, kind=key.removesuffix("_bytes")).set(value)


# --- the shared directory ----------------------------------------------------------------------


def _pid_of(path: Path) -> int | None:
    """``counter_1234.db`` → 1234 (prometheus_client names its files ``<kind>_<pid>.db``)."""
    try:
        return int(path.stem.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clear_stale(directory: Path) -> int:
    """Create the directory and delete the files of processes that are gone.

    Run once when the service starts (gunicorn's ``on_starting``): the values
    of an earlier run go, while a worker that started a moment earlier keeps
    its open file (deleting that would silently lose its counts). Returns the
    number of files removed.
    """
    directory.mkdir(parents=True, exist_ok=True)
    removed = 0
    for path in directory.glob("*.db"):
        pid = _pid_of(path)
        if pid is None or not _alive(pid):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def mark_process_dead(pid: int) -> None:
    """A process of this service exited (its live gauges stop counting; counts stay)."""
    if multiprocess_dir() is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


# --- scrape-time values from the database -------------------------------------------------------


class QueueCollector:
    """Per family, from the database at each scrape: waiting and running jobs,
    the oldest wait, and the workers seen (``orchestrator.queues.family_stats``)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def describe(self) -> Iterable[Metric]:
        return [*self._families(), self._up()]

    @staticmethod
    def _up() -> GaugeMetricFamily:
        return GaugeMetricFamily("orchestrator_queue_stats_up",
                                 "1 when the queue gauges could be read from the database")

    @staticmethod
    def _families() -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("orchestrator_queue_depth", "Jobs queued, not yet started",
                                labels=["family"])
        yield GaugeMetricFamily("orchestrator_jobs_running", "Jobs processing now", labels=["family"])
        yield GaugeMetricFamily("orchestrator_queue_oldest_wait_seconds",
                                "How long the oldest queued job has waited (0: none waits)",
                                labels=["family"])
        yield GaugeMetricFamily("orchestrator_workers_seen",
                                "Job slots of the workers seen within the heartbeat window",
                                labels=["family"])

    def collect(self) -> Iterator[Metric]:
        up = self._up()
        try:
            from orchestrator.queues import family_stats

            stats = family_stats(self.db)
        except Exception as e:  # noqa: BLE001 - a scrape must answer even with the database down
            log.warning("queue gauges unavailable (%s)", type(e).__name__)
            up.add_metric([], 0)
            yield up
            return
        depth, running, oldest, workers = self._families()
        for s in stats:
            depth.add_metric([s.family], s.depth)
            running.add_metric([s.family], s.running)
            oldest.add_metric([s.family], s.oldest_wait_seconds)
            workers.add_metric([s.family], s.workers)
        up.add_metric([], 1)
        yield from (depth, running, oldest, workers, up)
