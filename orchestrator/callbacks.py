"""Worker callbacks (CONTRACT §5): two body dialects, one normalised report.

- current: ``{job_id, status, assets: [path | {url}], error_message, enhanced_prompt?, metadata?}``
- legacy:  ``{jobId, status, filePath?, outputUrl?, imageUrls?, errorMessage?, enhancedPrompt?}``

Asset references become paths relative to the job's bucket, validated against
the job owner's folder; a URL is only parsed, never fetched.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy import bindparam, select

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


_UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
_JobId = Annotated[str, Field(pattern=_UUID_PATTERN, min_length=36, max_length=36,
                              json_schema_extra={"format": "uuid"})]
_Text = Annotated[str, Field(max_length=MAX_TEXT)]
_Ref = Annotated[str, Field(min_length=1, max_length=2048, description=(
    "`<user_id>/<file>`, `<bucket>/<user_id>/<file>` or a storage URL of the job's bucket"))]


class AssetObject(BaseModel):
    """An asset given as an object: its ``path`` or else its ``url`` is read."""

    model_config = ConfigDict(extra="allow", strict=True, json_schema_extra={"anyOf": [
        {"required": ["path"], "properties": {"path": {"type": "string", "minLength": 1}}},
        {"required": ["url"], "properties": {"url": {"type": "string", "minLength": 1}}}]})

    path: _Ref | None = None
    url: _Ref | None = None

    @model_validator(mode="after")
    def _one_reference(self) -> "AssetObject":
        if not (self.path or self.url):
            raise ValueError("an asset object needs a path or a url")
        return self


_Asset = _Ref | AssetObject


class CallbackBody(BaseModel):
    """A worker's report (CONTRACT §5), either dialect; names are tried in the order listed
    (``job_id`` then ``jobId``; ``assets``, then ``imageUrls``, then ``filePath``, then
    ``outputUrl``). Paths are checked against the job's bucket and owner afterwards."""

    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra={"anyOf": [
        {"required": ["job_id"], "properties": {"job_id": {"type": "string"}}},
        {"required": ["jobId"], "properties": {"jobId": {"type": "string"}}}]})

    job_id: _JobId | None = Field(default=None, description="The job (current dialect)")
    jobId: _JobId | None = Field(default=None, description="The job (legacy dialect)")
    status: Literal["processing", "completed", "failed"]
    attempt: int | None = Field(default=None, ge=0, le=2**31 - 1, description=(
        "The attempt the worker ran (the job JSON's `attempt`): a stale attempt changes nothing"))
    assets: list[_Asset] | None = Field(default=None, max_length=MAX_ASSETS)
    imageUrls: list[_Asset] | None = Field(default=None, max_length=MAX_ASSETS)
    filePath: str | None = Field(default=None, max_length=2048)
    outputUrl: str | None = Field(default=None, max_length=2048)
    thumbnail: _Asset | None = None
    thumbnail_url: _Asset | None = None
    thumbnailUrl: _Asset | None = None
    error_message: _Text | None = None
    errorMessage: _Text | None = None
    error: _Text | None = None
    enhanced_prompt: _Text | None = None
    enhancedPrompt: _Text | None = None
    metadata: dict[str, Any] | None = Field(default=None, description="Kept on the job's result")

    @model_validator(mode="after")
    def _has_job(self) -> "CallbackBody":
        if self.job_id is None and self.jobId is None:
            raise ValueError("job_id (or jobId) is required")
        return self


def check_shape(body: dict[str, Any]) -> CallbackBody:
    """``body`` as a :class:`CallbackBody`; :class:`InvalidRequest` naming the first problem."""
    try:
        return CallbackBody.model_validate(body)
    except ValidationError as e:
        details: list[dict[str, str]] = []
        for err in e.errors(include_url=False, include_input=False):
            # Union members tag their errors ("constrained-str", "function-after[...]"): not fields.
            where = ".".join(str(p) for p in err["loc"]
                             if isinstance(p, int) or (p.isidentifier() and p != "AssetObject"))
            detail = {"field": where or "body", "message": err["msg"]}
            if detail not in details:
                details.append(detail)
        raise InvalidRequest(f"Invalid callback: {details[0]['field']}", details=details) from None


@dataclass(frozen=True)
class CallbackReport:
    job_id: str
    status: JobStatus
    outcome: Outcome
    #: The job's facts, None when not read (``parse_callback(facts=False)``).
    lease_seconds: int | None
    family: str | None
    job_type: str | None
    #: The job was queued when this report was read (None: not read, its facts were known):
    #: a ``processing`` report then most likely claims it, else it renews a lease.
    was_queued: bool | None = None


@dataclass(frozen=True)
class JobFacts:
    """What a callback needs of its job before writing: columns that never change after
    submission (so they may be remembered), and the status when read."""

    job_type: str
    user_id: str
    family: str
    status: str | None  #: None: remembered, not read now


#: (database, job id) → (job_type, user_id, family), the jobs this process has seen lately:
#: a worker's repeated reports (lease renewals) need no read before their write.
_FACTS: dict[tuple[str, str], tuple[str, str, str]] = {}
_FACTS_LOCK = threading.Lock()
FACTS_REMEMBERED = 8192


@functools.cache
def _facts_statement() -> Any:
    jobs = Job.__table__
    return (select(jobs.c.job_type, jobs.c.user_id, jobs.c.family, jobs.c.status)
            .where(jobs.c.id == bindparam("b_id", type_=jobs.c.id.type)))


def _remember(store: dict[Any, Any], key: Any, value: Any) -> None:
    with _FACTS_LOCK:
        if key not in store and len(store) >= FACTS_REMEMBERED:
            del store[next(iter(store))]  # the oldest
        store[key] = value


def job_facts(db: Database, job_id: str) -> JobFacts | None:
    """The job's type, owner and family (None: no such job), remembered once read."""
    key = (db.url, job_id)
    known = _FACTS.get(key)
    if known is not None:
        return JobFacts(*known, status=None)
    with db.autocommit() as conn:
        row = conn.execute(_facts_statement(), {"b_id": job_id}).first()
    if row is None:
        return None
    _remember(_FACTS, key, (row[0], row[1], row[2]))
    return JobFacts(row[0], row[1], row[2], status=row[3])


#: (database, job id) of the jobs whose ``processing`` reports this process has applied.
_REPORTED: dict[tuple[str, str], bool] = {}


def likely_claim(db: Database, report: CallbackReport) -> bool:
    """Does this ``processing`` report most likely claim its job (rather than renew its
    lease)? Only the order of two exclusive CAS depends on it, never the outcome: the job
    was queued when read for this report, or (not read) no report of it was seen here."""
    if report.was_queued is not None:
        return report.was_queued
    return (db.url, report.job_id) not in _REPORTED


def reported(db: Database, job_id: str) -> None:
    """Note an applied ``processing`` report (for :func:`likely_claim`)."""
    _remember(_REPORTED, (db.url, job_id), True)


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


def parse_callback(storage: LocalStorage, db: Database, body: dict[str, Any], *,
                   facts: bool = True) -> CallbackReport:
    """Validate a callback body against its job.

    ``facts=False``: the job is read only when the report names files (their bucket and
    owner); otherwise the report's ``lease_seconds``, ``family`` and ``job_type`` are None
    (the lease follows the job's type, :func:`orchestrator.completion.report_processing`)
    and a missing job is found by the write.

    Raises:
        InvalidRequest: malformed body, unknown status, bad asset path.
        NotFound: no such job.
    """
    check_shape(body)
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
    refs = _references(body)
    thumb_ref = next((body[name] for name in ("thumbnail", "thumbnail_url", "thumbnailUrl")
                      if body.get(name) not in (None, "")), None)
    job = None
    if facts or refs or thumb_ref is not None:
        job = job_facts(db, job_id)
        if job is None:
            raise NotFound("Job not found")
    if len(refs) > MAX_ASSETS:
        raise InvalidRequest(f"at most {MAX_ASSETS} assets", details={"field": "assets"})
    paths = [storage.validate_key(job.job_type, to_bucket_path(r, job.job_type), owner=job.user_id)
             for r in refs] if job is not None else []
    thumbnail = (storage.validate_key(job.job_type, to_bucket_path(thumb_ref, job.job_type),
                                      owner=job.user_id)
                 if job is not None and thumb_ref is not None else None)
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
    if job is None:
        return CallbackReport(job_id, status, outcome, None, None, None)
    return CallbackReport(job_id, status, outcome, JOB_TYPES[job.job_type].hard_time_limit,
                          job.family, job.job_type,
                          None if job.status is None else job.status == JobStatus.QUEUED.value)
