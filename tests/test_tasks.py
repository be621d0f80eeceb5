"""The generation task and its signal handlers, run in this process through
Celery's own tracer (``Task.apply``), against the real database and storage."""
from __future__ import annotations

import threading
import time
import uuid

from sqlalchemy import func, select

from orchestrator import completion
from orchestrator.db import Database
from orchestrator.models import CreditEntry, Image, Job, JobEvent, Profile, Video
from orchestrator.status import JobStatus
from tasks.generation import run_generation
from tests.helpers import png_info, submit


def _run(job_id: str):  # type: ignore[no-untyped-def]
    return run_generation.apply(args=(job_id,), task_id=job_id)


def _balance(db: Database, user_id: str) -> int:
    with db.session() as s:
        return s.execute(select(Profile.token_balance).where(Profile.id == user_id)).scalar_one()


def test_task_completes_job_through_signals(db: Database, worker_runtime) -> None:  # type: ignore[no-untyped-def]
    user = str(uuid.uuid4())
    job = submit(db, user, "sdxl_image_fast", "two women and a man at a cafe")
    result = _run(job.id)
    assert result.successful()
    with db.session() as s:
        done = s.get(Job, job.id)
        image = s.get(Image, done.image_id)
        kinds = s.execute(select(JobEvent.type).where(JobEvent.job_id == job.id)
                          .order_by(JobEvent.id)).scalars().all()
    assert done.status == "completed" and done.progress == 100 and done.attempts == 1
    assert len(done.result["assets"]) == 6 and done.metadata_["primary_asset"] == done.result["assets"][0]
    assert image.status == "completed" and image.image_url == done.result["assets"][0]
    assert image.image_urls == done.result["assets"] and image.title == done.prompt[:60]
    assert image.metadata_["seeds"] == [done.seed + i for i in range(6)]
    for path in done.result["assets"]:
        assert path.startswith(f"{user}/")
        data = worker_runtime.storage.path_for("sdxl_image_fast", path).read_bytes()
        assert png_info(data) == ("PNG", (1024, 1024))
    assert kinds[0] == "job.queued" and "job.processing" in kinds and kinds[-2:] == [
        "job.completed", "image.completed"]
    assert _balance(db, user) == 99


def test_enhanced_type_stores_enhanced_prompt(db: Database, worker_runtime) -> None:  # type: ignore[no-untyped-def]
    job = submit(db, str(uuid.uuid4()), "video7b_fast_enhanced", "a cat surfing")
    _run(job.id)
    with db.session() as s:
        done = s.get(Job, job.id)
        video = s.get(Video, done.video_id)
    assert done.status == "completed"
    assert done.enhanced_prompt and done.enhanced_prompt != done.prompt
    assert done.enhanced_prompt.lower().startswith("a cat surfing")
    assert video.enhanced_prompt == done.enhanced_prompt and video.video_url.endswith(".mp4")
    assert video.thumbnail_url.endswith("_thumb.png") and video.completed_at is not None
    assert done.metadata_["enhancement"] == {"backend": "rules", "error": None}


def test_a_job_that_is_not_queued_does_no_work(db: Database, worker_runtime) -> None:  # type: ignore[no-untyped-def]
    user = str(uuid.uuid4())
    job = submit(db, user, "image_fast")
    completion.cancel_job(db, user, job.id)
    result = _run(job.id)
    assert result.get() == {"job_id": job.id, "skipped": True}
    with db.session() as s:
        assert s.get(Job, job.id).status == "cancelled" and s.get(Job, job.id).attempts == 0
    assert not (worker_runtime.storage.root / "image_fast").exists()
    # A duplicate delivery of a finished job is skipped the same way.
    job2 = submit(db, user, "image_fast")
    _run(job2.id)
    assert _run(job2.id).get()["skipped"] is True
    with db.session() as s:
        assert s.get(Job, job2.id).attempts == 1


def test_generator_failure_fails_and_refunds_once(db: Database, worker_runtime, tmp_path) -> None:  # type: ignore[no-untyped-def]
    user = str(uuid.uuid4())
    job = submit(db, user, "image_high")
    assert _balance(db, user) == 98
    # Storage that cannot be written: the root is a regular file.
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    from orchestrator.storage import LocalStorage

    worker_runtime.storage = LocalStorage(blocker, buckets=worker_runtime.storage.buckets)
    result = _run(job.id)
    assert result.failed()
    with db.session() as s:
        done = s.get(Job, job.id)
        image = s.get(Image, done.image_id)
        refunds = s.execute(select(func.count()).select_from(CreditEntry).where(
            CreditEntry.job_id == job.id, CreditEntry.reason == "job_refund")).scalar_one()
    assert done.status == "failed" and done.error_message
    assert "Traceback" not in done.error_message and str(tmp_path) not in done.error_message
    assert image.status == "failed" and refunds == 1 and _balance(db, user) == 100
    # A late duplicate failure report changes nothing.
    again = completion.finish_job(db, job.id, completion.Outcome(JobStatus.FAILED, attempt=1))
    assert not again.changed and _balance(db, user) == 100


def test_stale_attempt_cannot_complete(db: Database, worker_runtime) -> None:  # type: ignore[no-untyped-def]
    job = submit(db, str(uuid.uuid4()), "image_fast")
    claimed = completion.start_job(db, job.id, worker="w1", lease_seconds=60)
    assert claimed is not None and claimed.attempts == 1
    stale = completion.finish_job(db, job.id, completion.Outcome(
        JobStatus.COMPLETED, attempt=7, assets=[f"{job.user_id}/x.png"]))
    assert not stale.changed and stale.job.status == "processing"


def test_cancel_stops_a_running_job(db: Database, worker_runtime, settings) -> None:  # type: ignore[no-untyped-def]
    """A running job stops at its next progress report and ends cancelled, refunded once."""
    from dataclasses import replace

    worker_runtime.settings = replace(settings, generation_time_scale=0.03)  # ~8 s for video_high
    user = str(uuid.uuid4())
    job = submit(db, user, "video_high")
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(r=_run(job.id)))
    runner.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with db.session() as s:
            current = s.get(Job, job.id)
        if current.status == "processing" and current.progress > 0:
            break
        time.sleep(0.05)
    assert current.status == "processing"
    completion.cancel_job(db, user, job.id)
    runner.join(timeout=15)
    assert not runner.is_alive()
    assert outcome["r"].get()["aborted"] is True
    with db.session() as s:
        done = s.get(Job, job.id)
        refunds = s.execute(select(func.count()).select_from(CreditEntry).where(
            CreditEntry.job_id == job.id, CreditEntry.reason == "job_refund")).scalar_one()
    assert done.status == "cancelled" and done.result is None and refunds == 1
    assert _balance(db, user) == 100
    assert not (worker_runtime.storage.root / "video_high").exists()


def test_attempts_are_capped(db: Database, worker_runtime) -> None:  # type: ignore[no-untyped-def]
    job = submit(db, str(uuid.uuid4()), "image_fast")
    with db.transaction() as s:
        s.get(Job, job.id).attempts = 3  # three earlier runs died
    assert completion.start_job(db, job.id, worker="w", lease_seconds=60) is None
    with db.session() as s:
        done = s.get(Job, job.id)
    assert done.status == "failed" and done.error_message == "worker lost; all 3 attempts used"


def test_running_leases_are_renewed_and_a_lost_run_is_told(db: Database, worker_runtime,  # type: ignore[no-untyped-def]
                                                           settings) -> None:
    """The process's lease thread renews every running job (each every lease/4 s, at least
    0.5 s) and tells a run whose job was taken from it (cancelled) that it is lost."""
    from dataclasses import replace

    from tasks.generation import LeaseKeeper

    worker_runtime.settings = replace(settings, lease_seconds=2)
    user = str(uuid.uuid4())
    jobs = [completion.start_job(db, submit(db, user, "image_fast").id, worker="w",
                                 lease_seconds=2) for _ in range(2)]

    def lease_of(job_id: str):  # type: ignore[no-untyped-def]
        with db.session() as s:
            return s.get(Job, job_id).lease_expires_at

    first = [lease_of(j.id) for j in jobs]
    with LeaseKeeper(worker_runtime, jobs[0]) as a, LeaseKeeper(worker_runtime, jobs[1]) as b:
        time.sleep(1.3)
        assert all(lease_of(j.id) > f for j, f in zip(jobs, first))  # both renewed
        completion.cancel_job(db, user, jobs[1].id)
        deadline = time.monotonic() + 3
        while not b.lost.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert b.lost.is_set() and not a.lost.is_set()
    renewed = lease_of(jobs[0].id)
    time.sleep(1.2)
    assert lease_of(jobs[0].id) == renewed  # no renewals once the run ended


def test_a_shorter_lease_wakes_the_renewals(db: Database, worker_runtime, settings) -> None:  # type: ignore[no-untyped-def]
    """The lease thread sleeps until the next renewal due; a run added meanwhile whose
    renewal is due sooner (a shorter lease) wakes it, and is renewed in time."""
    from dataclasses import replace

    from tasks.generation import LeaseKeeper

    user = str(uuid.uuid4())
    long_job, short_job = (completion.start_job(db, submit(db, user, "image_fast").id, worker="w",
                                                lease_seconds=s) for s in (60, 2))
    assert long_job is not None and short_job is not None

    def lease_of(job_id: str):  # type: ignore[no-untyped-def]
        with db.session() as s:
            return s.get(Job, job_id).lease_expires_at

    first = lease_of(short_job.id)
    worker_runtime.settings = replace(settings, lease_seconds=60)
    with LeaseKeeper(worker_runtime, long_job):  # next renewal in 15 s
        time.sleep(0.2)  # the thread is asleep until then
        worker_runtime.settings = replace(settings, lease_seconds=2)
        with LeaseKeeper(worker_runtime, short_job):  # due in 0.5 s
            deadline = time.monotonic() + 3
            while lease_of(short_job.id) == first and time.monotonic() < deadline:
                time.sleep(0.05)
            assert lease_of(short_job.id) > first
