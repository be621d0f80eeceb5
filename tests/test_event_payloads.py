"""Event payloads are the rows they describe: on PostgreSQL the transitions of
``orchestrator.completion`` build them in SQL (one statement per transition), and
they must equal what ``orchestrator.records`` gives for the rows, JSON types and
timestamp spellings included (a whole-number float keeps its ``.0``, a timestamp
without microseconds has no fraction), on every backend."""
from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import select, update

from orchestrator import completion
from orchestrator.db import Database
from orchestrator.models import Image, Job, JobEvent, Video
from orchestrator.records import image_row, job_row, video_row
from orchestrator.status import JobStatus
from tests.helpers import submit

UTC = dt.timezone.utc


def _latest(db: Database, job_id: str) -> dict[str, Any]:
    """The latest event payload of each entity of the job, and the events' types in order."""
    with db.session() as s:
        evs = s.execute(select(JobEvent).where(JobEvent.job_id == job_id)
                        .order_by(JobEvent.id)).scalars().all()
    return {"types": [e.type for e in evs], **{e.entity: e.payload for e in evs}}


def _types(row: dict[str, Any]) -> dict[str, type]:
    return {k: type(v) for k, v in row.items()}


def _assert_rows(db: Database, job_id: str) -> list[str]:
    with db.session() as s:
        job = s.get(Job, job_id)
        asset = s.get(Video, job.video_id) if job.video_id else s.get(Image, job.image_id)
    latest = _latest(db, job_id)
    assert latest["job"] == job_row(job)
    if isinstance(asset, Video):
        assert latest["video"] == video_row(asset)
        assert _types(latest["video"]) == _types(video_row(asset))
    else:
        assert latest["image"] == image_row(asset)
    assert _types(latest["job"]) == _types(job_row(job))
    return latest["types"]


def test_payloads_equal_the_rows_through_a_worker_run(db: Database) -> None:
    user = str(uuid.uuid4())
    job = submit(db, user, "video_fast", "ünïcödé ☃ and a \"quoted\" prompt " * 3)
    with db.transaction() as s:  # a whole-number duration, timestamps without microseconds
        s.execute(update(Video).where(Video.id == job.video_id).values(
            duration=5.0, created_at=dt.datetime(2026, 1, 1, tzinfo=UTC)))
        s.execute(update(Job).where(Job.id == job.id).values(
            created_at=dt.datetime(2026, 1, 1, 0, 0, 0, 120000, tzinfo=UTC)))
    assert completion.start_job(db, job.id, worker="host:1", lease_seconds=60) is not None
    _assert_rows(db, job.id)
    assert completion.record_progress(db, job.id, 1, 40, lease_seconds=60)
    assert completion.record_enhancement(db, job.id, 1, prompt="enhanced", backend="rules",
                                         error=None)
    _assert_rows(db, job.id)
    done = completion.finish_job(db, job.id, completion.Outcome(
        JobStatus.COMPLETED, attempt=1, assets=[f"{user}/{job.id}.mp4"],
        thumbnail=f"{user}/{job.id}_thumb.png", enhanced_prompt="enhanced",
        metadata={"generator": "procedural", "seeds": [7, 2.5], "other": {"a": None}}))
    assert done.changed
    types = _assert_rows(db, job.id)
    assert types == ["job.queued", "video.queued", "job.processing", "video.generating",
                     "job.progress", "job.enhanced", "video.generating", "job.completed",
                     "video.completed"]


def test_payloads_equal_the_rows_through_failures_and_requeues(db: Database) -> None:
    user = str(uuid.uuid4())
    job = submit(db, user, "sdxl_image_fast", num_images=2)
    assert completion.start_job(db, job.id, worker="host:1", lease_seconds=-1) is not None
    assert completion.requeue_expired(db, job.id, 1)
    _assert_rows(db, job.id)
    completion.report_processing(db, job.id, worker="ext", lease_seconds=None)
    _assert_rows(db, job.id)
    assert completion.requeue_for_retry(db, job.id, 2, "busy")
    assert completion.start_job(db, job.id, worker="host:1", lease_seconds=60) is not None
    assert completion.release(db, job.id)
    failed = completion.finish_job(db, job.id, completion.Outcome(JobStatus.FAILED, error="boom"))
    assert failed.changed
    types = _assert_rows(db, job.id)
    assert types[-2:] == ["job.failed", "image.failed"]
    other = submit(db, user, "image_fast")
    completion.cancel_job(db, user, other.id)
    assert _assert_rows(db, other.id)[-2:] == ["job.cancelled", "image.failed"]
