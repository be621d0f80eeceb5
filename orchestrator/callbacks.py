"""Worker callbacks (CONTRACT §5): two body dialects, one normalised report.

- current: ``{job_id, status, assets: [path | {url}], error_message, enhanced_prompt?, metadata?}``
- legacy:  ``{jobId, status, filePath?, outputUrl?, imageUrls?, errorMessage?, enhancedPrompt?}``

Asset references become paths relative to the job's bucket, validated against
the job owner's folder; a URL is only parsed, never fetched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from orchestrator.completion import Outcome
from orchestrator.db import Database
from orchestrator.errors import InvalidRequest, NotFound
from orchestrator.jobtypes import JOB_TYPES
from orchestrator.models import Job
from orchestrator.queries import canonical_uuid, unstorable
from orchestrator.status import JobStatus
from orchestrator.storage import LocalStorage

MAX_ASSETS = 16
MAX_TEXT = 4000


@dataclass(frozen=True)
class CallbackReport:
    job_id: str
    status: JobStatus
    outcome: Outcome
    lease_seconds: int
    family: str


def _text(body: dict[str, Any], *names: str) -> str | None:
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise InvalidRequest(f"{name} must be a string", details={"field": name})
        if len(value) > MAX_TEXT:
            raise InvalidRequest(f"{name} is too long", details={"field": name})
        if unstorable(value, name) is not None:
            raise InvalidRequest(f"{name} is not valid Unicode", details={"field": name})
        return value
    return None


def _references(body: dict[str, Any]) -> list[Any]:
    if body.get("assets") is not None:
        refs = body["assets"]
        if not isinstance(refs, list):
            raise InvalidRequest("assets must be a list", details={"field": "assets"})
        return refs
    if body.get("imageUrls") is not None:
        if not isinstance(body["imageUrls"], list):
            raise InvalidRequest("imageUrls must be a list", details={"field": "imageUrls"})
        return body["imageUrls"]
    for name in ("filePath", "outputUrl"):
        single = body.get(name)
        if single is None or single == "":
            continue
        if not isinstance(single, str):
            raise InvalidRequest(f"{name} must be a string", details={"field": name})
        return [single]
    return []


def to_bucket_path(ref: Any, bucket: str) -> str:
    """A path, ``bucket/path`` or storage URL → the path relative to the bucket."""
    if isinstance(ref, dict):
        ref = ref.get("path") or ref.get("url")
    if not isinstance(ref, str) or not ref:
        raise InvalidRequest("each asset must be a path string or an object with a url",
                             details={"field": "assets"})
    if ref.startswith(("http://", "https://")):
        path = unquote(urlsplit(ref).path)
        marker = f"/{bucket}/"
        if marker not in path:
            raise InvalidRequest("asset URL is not in the job's bucket", details={"field": "assets"})
        return path.split(marker, 1)[1]
    if ref.startswith(f"{bucket}/"):
        return ref[len(bucket) + 1:]
    return ref


def parse_callback(storage: LocalStorage, db: Database, body: dict[str, Any]) -> CallbackReport:
    """Validate a callback body against its job.

    Raises:
        InvalidRequest: malformed body, unknown status, bad asset path.
        NotFound: no such job.
    """
    job_id = canonical_uuid(_text(body, "job_id", "jobId"))
    if job_id is None:
        raise InvalidRequest("job_id must be a job uuid", details={"field": "job_id"})
    raw_status = _text(body, "status")
    try:
        status = JobStatus(raw_status)
    except ValueError:
        raise InvalidRequest("status must be processing, completed or failed",
                             details={"field": "status"}) from None
    if status not in (JobStatus.PROCESSING, JobStatus.COMPLETED, JobStatus.FAILED):
        raise InvalidRequest("status must be processing, completed or failed",
                             details={"field": "status"})
    attempt = body.get("attempt")
    if attempt is not None and (isinstance(attempt, bool) or not isinstance(attempt, int)):
        raise InvalidRequest("attempt must be an integer", details={"field": "attempt"})
    with db.session() as session:
        job = session.get(Job, job_id)
    if job is None:
        raise NotFound("Job not found")
    bucket = job.job_type
    refs = _references(body)
    if len(refs) > MAX_ASSETS:
        raise InvalidRequest(f"at most {MAX_ASSETS} assets", details={"field": "assets"})
    paths = [storage.validate_key(bucket, to_bucket_path(r, bucket), owner=job.user_id)
             for r in refs]
    thumb_ref = next((body[name] for name in ("thumbnail", "thumbnail_url", "thumbnailUrl")
                      if body.get(name) not in (None, "")), None)
    thumbnail = (storage.validate_key(bucket, to_bucket_path(thumb_ref, bucket), owner=job.user_id)
                 if thumb_ref is not None else None)
    metadata = body.get("metadata")
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise InvalidRequest("metadata must be an object", details={"field": "metadata"})
    bad = unstorable(metadata, "metadata")
    if bad is not None:
        raise InvalidRequest(f"{bad} holds a non-finite number or invalid Unicode",
                             details={"field": bad})
    outcome = Outcome(
        status, attempt=attempt, assets=paths, thumbnail=thumbnail,
        error=_text(body, "error_message", "errorMessage", "error"),
        enhanced_prompt=_text(body, "enhanced_prompt", "enhancedPrompt"),
        metadata={"callback": metadata} if metadata else {})
    return CallbackReport(job_id, status, outcome, JOB_TYPES[job.job_type].hard_time_limit,
                          job.family)
