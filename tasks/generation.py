"""The generation task: claim the job, enhance, generate, store the files.

The task only does the work and returns what it made; the signal handlers in
``tasks.signals`` record the outcome through ``orchestrator.completion``.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from celery import Task
from sqlalchemy.exc import DBAPIError

from orchestrator import completion, faults
from orchestrator.errors import TransientGenerationError
from orchestrator.jobtypes import JOB_TYPES, Family
from orchestrator.models import Job
from tasks.celery_app import celery_app
from tasks.generators.base import GenerationSpec
from tasks.routing import GENERATION_TASK
from tasks.runtime import CLAIMED, Runtime, runtime

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.5
CLAIM_RETRY_S = 2


class RunAborted(Exception):
    """The job was cancelled or taken over while it ran: stop, record nothing."""


class LeaseKeeper:
    """Renews the job's lease from a background thread while the job runs.

    The lease outlives a few missed heartbeats, no more: when a worker dies,
    its job is claimable again within ``lease_seconds``. When a renewal finds
    the run no longer current (cancelled, taken over), ``lost`` is set and the
    next progress report stops the run.

    One thread per process renews every run of that process (see
    :class:`_Renewals`): a job does not start and join a thread of its own.
    """

    def __init__(self, rt: Runtime, job: Job) -> None:
        self.rt, self.job = rt, job
        self.lease_seconds = rt.settings.lease_seconds
        self.interval = max(self.lease_seconds / 4, 0.5)
        self.lost = threading.Event()
        self.due = 0.0

    def __enter__(self) -> "LeaseKeeper":
        _Renewals.of_this_process().add(self)
        return self

    def __exit__(self, *_: Any) -> None:
        _Renewals.of_this_process().discard(self)

    def renew(self) -> bool:
        """One renewal; False once the run is no longer current (stop renewing)."""
        try:
            if not completion.renew_lease(self.rt.db, self.job.id, self.job.attempts,
                                          self.lease_seconds):
                self.lost.set()
                return False
        except Exception as e:  # noqa: BLE001 - database down: keep trying, the lease may hold
            log.warning("lease renewal for job %s failed: %s", self.job.id, type(e).__name__)
        return True


class _Renewals:
    """The process's running leases and the one daemon thread that renews each of them
    every ``interval`` seconds (started with the first run; a forked child starts its own)."""

    _current: "_Renewals | None" = None

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.runs: set[LeaseKeeper] = set()
        self.changed = threading.Condition()
        self.wakes_at = 0.0  # when the loop wakes next, unless notified
        threading.Thread(target=self._loop, name="lease-renewals", daemon=True).start()

    @classmethod
    def of_this_process(cls) -> "_Renewals":
        current = cls._current
        if current is None or current.pid != os.getpid():
            with _RENEWALS_LOCK:
                current = cls._current
                if current is None or current.pid != os.getpid():
                    current = cls._current = cls()
        return current

    def add(self, keeper: LeaseKeeper) -> None:
        with self.changed:
            keeper.due = time.monotonic() + keeper.interval
            self.runs.add(keeper)
            if keeper.due < self.wakes_at:
                # Due before the loop's next wake-up (a shorter lease than the others'):
                # wake it to wait less. Otherwise nothing (one thread switch less per job).
                self.changed.notify()

    def discard(self, keeper: LeaseKeeper) -> None:
        with self.changed:
            self.runs.discard(keeper)

    def _loop(self) -> None:
        while True:
            with self.changed:
                now = time.monotonic()
                due = [k for k in self.runs if k.due <= now]
                if not due:
                    self.wakes_at = min((k.due for k in self.runs), default=now + 3600)
                    self.changed.wait(self.wakes_at - now)
                    continue
                for keeper in due:
                    keeper.due = now + keeper.interval
            for keeper in due:
                if keeper in self.runs and not keeper.renew():
                    self.discard(keeper)


_RENEWALS_LOCK = threading.Lock()


class ProgressReporter:
    """Writes progress at a bounded rate; raises :class:`RunAborted` when the
    run is no longer current (cooperative cancel)."""

    def __init__(self, rt: Runtime, job: Job, keeper: LeaseKeeper) -> None:
        self.rt, self.job, self.keeper = rt, job, keeper
        self.last_write = time.monotonic()
        self.last_pct = 0

    def __call__(self, step: int, total: int) -> None:
        if self.keeper.lost.is_set():
            raise RunAborted(self.job.id)
        pct = int(step * 100 / max(total, 1))
        now = time.monotonic()
        if pct <= self.last_pct or now - self.last_write < PROGRESS_INTERVAL_S:
            return
        self.last_write, self.last_pct = now, pct
        try:
            current = completion.record_progress(self.rt.db, self.job.id, self.job.attempts,
                                                 min(pct, 99), lease_seconds=self.keeper.lease_seconds)
        except DBAPIError as e:
            # Progress is a courtesy: a database outage must not fail the job.
            log.warning("progress of job %s not recorded (%s)", self.job.id, type(e).__name__)
            return
        if not current:
            raise RunAborted(self.job.id)


def _spec(job: Job, prompt: str, time_scale: float) -> GenerationSpec:
    t = JOB_TYPES[job.job_type]
    return GenerationSpec(
        job_id=job.id, job_type=t.name, format=t.format, prompt=prompt,
        negative_prompt=job.negative_prompt, width=t.width, height=t.height, steps=t.steps,
        guidance=t.guidance, frames=t.frames, fps=t.fps,
        num_outputs=int((job.metadata_ or {}).get("num_images") or t.outputs), seed=job.seed,
        expected_seconds=t.expected_seconds, time_scale=time_scale,
        sample_solver=t.sample_solver, sample_shift=t.sample_shift)


@celery_app.task(name=GENERATION_TASK, bind=True, acks_late=True, reject_on_worker_lost=True,
                 max_retries=None)
def run_generation(self: Task, job_id: str) -> dict[str, Any]:
    """Run one job. Returns ``{"skipped": True}`` when the job was not ours to run."""
    rt = runtime()
    try:
        job = completion.start_job(rt.db, job_id, worker=rt.worker_id,
                                   lease_seconds=rt.settings.lease_seconds)
    except DBAPIError as e:
        # The database is down: the job is untouched; try this message again later.
        log.warning("cannot claim job %s (%s); retrying", job_id, type(e).__name__)
        raise self.retry(exc=e, countdown=CLAIM_RETRY_S)
    if job is None:
        log.info("job %s not claimable; skipping delivery", job_id)
        return {"job_id": job_id, "skipped": True}
    CLAIMED[self.request.id] = job.attempts
    spec = JOB_TYPES[job.job_type]
    with LeaseKeeper(rt, job) as keeper:
        try:
            faults.at_job_start(rt.settings, job.metadata_, job.attempts)
            prompt = job.prompt
            if spec.enhanced:
                enh = rt.enhancer.enhance(prompt, format=spec.format, quality=spec.quality)
                if not completion.record_enhancement(rt.db, job.id, job.attempts, prompt=enh.prompt,
                                                     backend=enh.backend, error=enh.error):
                    raise RunAborted(job.id)
                prompt = enh.prompt
            result = rt.generator(Family(job.family)).generate(
                _spec(job, prompt, rt.settings.generation_time_scale),
                ProgressReporter(rt, job, keeper))
            if keeper.lost.is_set():
                raise RunAborted(job.id)
            paths = [_store(rt, job, f.name, f.data) for f in result.files]
            thumb = (_store(rt, job, result.thumbnail.name, result.thumbnail.data)
                     if result.thumbnail else None)
        except RunAborted:
            log.info("job %s attempt %s aborted (cancelled or superseded)", job.id, job.attempts)
            return {"job_id": job.id, "attempt": job.attempts, "aborted": True}
        except TransientGenerationError as e:
            if job.attempts < job.max_attempts:
                # Requeue first: the retried delivery must find the job claimable.
                completion.requeue_for_retry(rt.db, job.id, job.attempts, e.message)
                raise self.retry(exc=e, countdown=min(2 ** job.attempts, 60))
            raise
    return {"job_id": job.id, "attempt": job.attempts, "assets": paths, "thumbnail": thumb,
            "enhanced_prompt": prompt if spec.enhanced else None, "metadata": result.metadata}


def _store(rt: Runtime, job: Job, name: str, data: bytes) -> str:
    key = f"{job.user_id}/{name}"
    rt.storage.write(job.job_type, key, data, owner=job.user_id)
    return key


# The completion handlers must be connected wherever this task can run.
import tasks.signals  # noqa: E402,F401
