"""Queues as users and operators see them: position, ETA, depth, workers.

A queued job's ``queue_position`` is 1 + the queued jobs of its family ahead of
it (earlier ``queued_at``); its ``eta_seconds`` estimates when it will be done:
the work ahead spread over the live workers of the family, plus its own run,
each from a rolling measured duration (median of the last completions) that
falls back to the job type's expected time until there are measurements.

Workers are "seen" through heartbeats: Celery workers beat every few seconds
(``tasks.signals``); external workers are seen when they lease a job.
"""
from __future__ import annotations

import datetime as dt
import math
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from orchestrator.db import Database
from orchestrator.jobtypes import JOB_TYPES, Family
from orchestrator.models import Job, WorkerHeartbeat, utcnow
from orchestrator.status import JobStatus

#: A worker unseen for this long no longer counts.
WORKER_TTL = dt.timedelta(seconds=30)
#: Completions a rolling duration is measured over.
SAMPLE = 200
#: Window of ``completions_per_minute``.
RATE_WINDOW = dt.timedelta(minutes=5)
QUEUED, PROCESSING, COMPLETED = (JobStatus.QUEUED.value, JobStatus.PROCESSING.value,
                                 JobStatus.COMPLETED.value)
FAMILIES = tuple(f.value for f in Family)


# --- worker heartbeats ------------------------------------------------------------------------


def beat(db: Database, name: str, family: str, concurrency: int = 1) -> None:
    """Record that a worker is alive now (insert or refresh its row)."""
    now = utcnow()
    with db.transaction() as session:
        changed = session.execute(update(WorkerHeartbeat).where(WorkerHeartbeat.name == name).values(
            family=family, concurrency=concurrency, last_seen=now)).rowcount
        if not changed:
            session.add(WorkerHeartbeat(name=name, family=family, concurrency=concurrency, last_seen=now))


def forget(db: Database, name: str) -> None:
    """A worker shutting down cleanly stops counting at once."""
    with db.transaction() as session:
        session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.name == name))


def live_workers(session: Session, now: dt.datetime | None = None) -> dict[str, int]:
    """Family → job slots of the workers seen within ``WORKER_TTL``."""
    now = now or utcnow()
    rows = session.execute(select(WorkerHeartbeat.family, func.sum(WorkerHeartbeat.concurrency))
                           .where(WorkerHeartbeat.last_seen > now - WORKER_TTL)
                           .group_by(WorkerHeartbeat.family)).all()
    return {family: int(n or 0) for family, n in rows}


# --- durations --------------------------------------------------------------------------------


def _seconds(a: dt.datetime | None, b: dt.datetime | None) -> float | None:
    return (b - a).total_seconds() if a and b else None


def recent_runs(session: Session, family: str, limit: int = SAMPLE) -> list[tuple[str, float]]:
    """(job type, run seconds) of the family's latest completions, newest first."""
    rows = session.execute(
        select(Job.job_type, Job.started_at, Job.completed_at)
        .where(Job.family == family, Job.status == COMPLETED, Job.completed_at.is_not(None))
        .order_by(Job.completed_at.desc()).limit(limit)).all()
    return [(t, s) for t, a, b in rows if (s := _seconds(a, b)) is not None and s >= 0]


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


# --- positions and ETAs -----------------------------------------------------------------------


def positions(session: Session, job_ids: Iterable[str]) -> dict[str, int]:
    """Queue position (1 = next) of each of these jobs that is queued, in one query."""
    ids = list(job_ids)
    if not ids:
        return {}
    ahead = aliased(Job)
    count_ahead = (select(func.count()).select_from(ahead).where(
        ahead.family == Job.family, ahead.status == QUEUED,
        or_(ahead.queued_at < Job.queued_at,
            and_(ahead.queued_at == Job.queued_at, ahead.id < Job.id))).scalar_subquery())
    rows = session.execute(select(Job.id, count_ahead).where(Job.id.in_(ids), Job.status == QUEUED)).all()
    return {job_id: int(n) + 1 for job_id, n in rows}


def user_positions(session: Session, user_id: str, limit: int = 100) -> dict[str, int]:
    """Positions of a user's queued jobs (its first ``limit``), one pass over the queues."""
    ranked = select(Job.id, Job.user_id, func.row_number().over(
        partition_by=Job.family, order_by=(Job.queued_at, Job.id)).label("position")
    ).where(Job.status == QUEUED).subquery()
    rows = session.execute(select(ranked.c.id, ranked.c.position)
                           .where(ranked.c.user_id == user_id)
                           .order_by(ranked.c.position).limit(limit)).all()
    return {job_id: int(position) for job_id, position in rows}


@dataclass
class Estimates:
    """The measured inputs of ETAs, cached per process for ``refresh_seconds``."""

    db: Database
    refresh_seconds: float = 5.0
    _workers: Mapping[str, int] = field(default_factory=dict)
    _running: Mapping[str, int] = field(default_factory=dict)
    _by_type: Mapping[str, float] = field(default_factory=dict)
    _by_family: Mapping[str, float] = field(default_factory=dict)
    _loaded_at: float = float("-inf")
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _refresh(self) -> None:
        if time.monotonic() - self._loaded_at < self.refresh_seconds:
            return
        with self._lock:
            if time.monotonic() - self._loaded_at < self.refresh_seconds:
                return
            with self.db.session() as session:
                workers = live_workers(session)
                running = dict(session.execute(
                    select(Job.family, func.count()).where(Job.status == PROCESSING)
                    .group_by(Job.family)).all())
                by_type: dict[str, float] = {}
                by_family: dict[str, float] = {}
                for family in FAMILIES:
                    runs = recent_runs(session, family)
                    if runs:
                        by_family[family] = statistics.median(s for _, s in runs)
                    for job_type in {t for t, _ in runs}:
                        by_type[job_type] = statistics.median(s for t, s in runs if t == job_type)
            self._workers, self._running = workers, running
            self._by_type, self._by_family = by_type, by_family
            self._loaded_at = time.monotonic()

    def run_seconds(self, job_type: str) -> float:
        """Rolling median run time of the type, else the family's, else the expected time."""
        self._refresh()
        spec = JOB_TYPES[job_type]
        return self._by_type.get(job_type) or self._by_family.get(spec.family.value) \
            or float(spec.expected_seconds)

    def eta_seconds(self, job_type: str, position: int) -> float | None:
        """Seconds until a job at ``position`` is done; None while no worker of its family is seen."""
        self._refresh()
        family = JOB_TYPES[job_type].family.value
        slots = self._workers.get(family, 0)
        if slots <= 0:
            return None
        typical = self._by_family.get(family) or self.run_seconds(job_type)
        # Jobs ahead, plus the running ones (half done on average), shared by the slots.
        ahead = (position - 1) + 0.5 * min(self._running.get(family, 0), slots)
        return round(ahead / slots * typical + self.run_seconds(job_type), 1)

    def annotate(self, records: list[dict[str, Any]], found: Mapping[str, int]) -> None:
        """Set ``queue_position`` and ``eta_seconds`` on job records (None unless queued)."""
        for record in records:
            position = found.get(record["id"])
            record["queue_position"] = position
            record["eta_seconds"] = (self.eta_seconds(record["job_type"], position)
                                     if position is not None else None)


# --- the operators' view ----------------------------------------------------------------------


@dataclass(frozen=True)
class FamilyStats:
    family: str
    depth: int
    oldest_wait_seconds: float
    running: int
    workers: int
    completions_per_minute: float
    p50_run_seconds: float | None
    p95_run_seconds: float | None


def family_stats(db: Database) -> list[FamilyStats]:
    """Per family: queued, oldest wait, running, workers seen, throughput, run-time percentiles."""
    now = utcnow()
    with db.session() as session:
        queued = {f: (n, oldest) for f, n, oldest in session.execute(
            select(Job.family, func.count(), func.min(Job.queued_at))
            .where(Job.status == QUEUED).group_by(Job.family)).all()}
        running = dict(session.execute(select(Job.family, func.count())
                                       .where(Job.status == PROCESSING).group_by(Job.family)).all())
        done = dict(session.execute(select(Job.family, func.count())
                                    .where(Job.status == COMPLETED, Job.completed_at > now - RATE_WINDOW)
                                    .group_by(Job.family)).all())
        workers = live_workers(session, now)
        runs = {family: [s for _, s in recent_runs(session, family)] for family in FAMILIES}
    out = []
    for family in FAMILIES:
        depth, oldest = queued.get(family, (0, None))
        if oldest is not None and oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=dt.timezone.utc)
        out.append(FamilyStats(
            family=family, depth=int(depth),
            oldest_wait_seconds=round(max(0.0, (now - oldest).total_seconds()), 3) if oldest else 0.0,
            running=int(running.get(family, 0)), workers=workers.get(family, 0),
            completions_per_minute=round(done.get(family, 0) / (RATE_WINDOW.total_seconds() / 60), 3),
            p50_run_seconds=percentile(runs[family], 50), p95_run_seconds=percentile(runs[family], 95)))
    return out
