"""The job event log: one numbered row per change of a job, image or video.

Events are appended in the same transaction as the change they describe, so
the log never says something the tables do not (and vice versa).
"""
from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from orchestrator.models import Image, Job, JobEvent, Video, utcnow
from orchestrator.records import image_row, job_row, video_row


def job_event(job: Job, kind: str | None = None) -> JobEvent:
    """An event carrying the job's full new row; ``kind`` defaults to its status."""
    return JobEvent(user_id=job.user_id, job_id=job.id, entity="job", entity_id=job.id,
                    type=f"job.{kind or job.status}", payload=job_row(job), created_at=utcnow())


def asset_event(asset: Image | Video, job_id: str | None) -> JobEvent:
    entity = "image" if isinstance(asset, Image) else "video"
    payload = image_row(asset) if isinstance(asset, Image) else video_row(asset)
    return JobEvent(user_id=asset.user_id, job_id=job_id, entity=entity, entity_id=asset.id,
                    type=f"{entity}.{asset.status}", payload=payload, created_at=utcnow())


def append(session: Session, *events: JobEvent) -> None:
    session.add_all(events)


def payloads(session: Session, job_id: str) -> list[dict[str, Any]]:
    """A job's events in order (for the CLI and tests)."""
    rows = session.query(JobEvent).filter(JobEvent.job_id == job_id).order_by(JobEvent.id)
    return [{"id": e.id, "type": e.type, "entity": e.entity, "payload": e.payload} for e in rows]
