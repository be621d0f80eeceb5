"""Rows as JSON: the job record of the API and the payloads of the event log.

``*_row`` functions give every column, JSON-safe (what the event log stores:
the full new row). ``job_record`` adds what a client needs on top: the asset
list with download URLs, which expire and so are never stored.
"""
from __future__ import annotations

import datetime as dt
from typing import Any, Callable

from orchestrator.models import Image, Job, Video

#: (bucket, path) → a URL that downloads the file.
UrlFor = Callable[[str, str], str]


def iso(value: dt.datetime | None) -> str | None:
    """ISO 8601 in UTC with a ``Z``, the way the legacy API spelled timestamps."""
    if value is None:
        return None
    return value.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _row(obj: Any, columns: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in columns:
        value = getattr(obj, "metadata_" if name == "metadata" else name)
        out[name] = iso(value) if isinstance(value, dt.datetime) else value
    return out


JOB_COLUMNS = (
    "id", "user_id", "job_type", "status", "format", "quality", "model_variant", "family",
    "prompt", "negative_prompt", "enhanced_prompt", "metadata", "result", "project_id",
    "image_id", "video_id", "seed", "credits", "charges", "progress", "attempts", "max_attempts",
    "error_message", "lease_owner", "lease_expires_at", "created_at", "updated_at",
    "queued_at", "dispatched_at", "started_at", "completed_at",
)
IMAGE_COLUMNS = (
    "id", "user_id", "project_id", "title", "prompt", "enhanced_prompt", "status", "image_url",
    "image_urls", "thumbnail_url", "quality", "generation_mode", "metadata", "created_at",
    "updated_at", "completed_at",
)
VIDEO_COLUMNS = (
    "id", "user_id", "project_id", "title", "prompt", "enhanced_prompt", "status", "video_url",
    "thumbnail_url", "duration", "resolution", "format", "quality", "metadata", "created_at",
    "updated_at", "completed_at",
)


def job_row(job: Job) -> dict[str, Any]:
    return _row(job, JOB_COLUMNS)


def image_row(image: Image) -> dict[str, Any]:
    return _row(image, IMAGE_COLUMNS)


def video_row(video: Video) -> dict[str, Any]:
    return _row(video, VIDEO_COLUMNS)


def job_assets(job: Job | dict[str, Any]) -> list[tuple[str, str]]:
    """The job's finished files as (bucket, path) pairs, in output order."""
    result = job.get("result") if isinstance(job, dict) else job.result
    if not result:
        return []
    bucket = result.get("bucket")
    return [(bucket, path) for path in result.get("assets", [])]


def job_record(job: Job, url_for: UrlFor) -> dict[str, Any]:
    """The job as the API returns it (CONTRACT §2 ``job``; GET /v1/jobs/<id>)."""
    row = job_row(job)
    record = {k: row[k] for k in (
        "id", "user_id", "job_type", "status", "format", "quality", "model_variant")}
    record["queue"] = job.family
    record.update({k: row[k] for k in (
        "prompt", "negative_prompt", "enhanced_prompt", "metadata", "project_id", "image_id",
        "video_id", "progress", "attempts", "max_attempts", "credits", "error_message",
        "created_at", "dispatched_at", "started_at", "completed_at", "updated_at")})
    record["assets"] = [{"bucket": b, "path": p, "url": url_for(b, p)} for b, p in job_assets(job)]
    thumb = (job.result or {}).get("thumbnail")
    record["thumbnail"] = (
        {"bucket": job.result["bucket"], "path": thumb, "url": url_for(job.result["bucket"], thumb)}
        if thumb else None)
    return record


def asset_record(row: dict[str, Any], bucket: str | None, url_for: UrlFor) -> dict[str, Any]:
    """An image/video row with download URLs beside its bucket-relative paths."""
    out = dict(row)
    urls: dict[str, Any] = {}
    if bucket:
        for field in ("image_url", "video_url", "thumbnail_url"):
            if out.get(field):
                urls[field] = url_for(bucket, out[field])
        if out.get("image_urls"):
            urls["image_urls"] = [url_for(bucket, p) for p in out["image_urls"]]
    out["bucket"] = bucket
    out["download_urls"] = urls
    return out
