"""Requests and answers as pydantic models. The request models validate what
the views read; every model here is also the source of the OpenAPI document
(``web.openapi``), so the document cannot drift from the validation."""
from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, TypeVar, Union

from flask import request
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, RootModel, ValidationError,
                      conlist)

from orchestrator.errors import InvalidRequest
from orchestrator.idempotency import MAX_KEY_CHARS
from orchestrator.jobtypes import JOB_TYPES, VALID_JOB_TYPES
from orchestrator.queries import MAX_PAGE
from orchestrator.status import AssetStatus, JobStatus
from orchestrator.submission import MAX_PROMPT_CHARS, SubmitRequest, resolve_job_type
from web.errors import validation_details

MAX_METADATA_BYTES = 16 * 1024
#: Deepest nesting of arrays/objects a request body may have (the body itself is depth 1).
MAX_JSON_DEPTH = 32

M = TypeVar("M", bound=BaseModel)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, strict=True)


#: An id in the one spelling the service accepts (hyphenated; stored lowercase).
UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
Uuid = Annotated[str, Field(pattern=UUID_PATTERN, min_length=36, max_length=36,
                            json_schema_extra={"format": "uuid"})]
Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
#: A prompt that says something: whitespace alone is refused (it is stripped first).
NonBlankPrompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS, pattern=r"\S")]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1, description="Generation seed (default: derived from the job id)")]

JobTypeName = Literal[VALID_JOB_TYPES]  # type: ignore[valid-type]
JobStatusName = Literal[tuple(s.value for s in JobStatus)]  # type: ignore[valid-type]
AssetStatusName = Literal[tuple(s.value for s in AssetStatus)]  # type: ignore[valid-type]
_SDXL_TYPES = tuple(t.name for t in JOB_TYPES.values() if t.is_sdxl)
_WAN_IMAGE_TYPES = tuple(t.name for t in JOB_TYPES.values() if not t.is_sdxl and not t.is_video)
_VIDEO_TYPES = tuple(t.name for t in JOB_TYPES.values() if t.is_video)


class _Metadata(BaseModel):
    """``metadata`` of a job: the options below are checked; anything else is kept on the job."""

    model_config = ConfigDict(extra="allow", strict=True)

    prompt: Prompt | None = Field(default=None, description=(
        "The prompt; a project's enhanced, then original prompt take precedence"))
    seed: Seed | None = None


class SdxlMetadata(_Metadata):
    num_images: int | None = Field(default=None, ge=1, le=6, description="Images to make (default 6)")
    negative_prompt: Prompt | None = Field(default=None, description=(
        "Prepended to the negative prompt the service builds"))


class WanMetadata(_Metadata):
    num_images: int | None = Field(default=None, ge=1, le=1, description="WAN types make one output")


#: queue-job needs a prompt: from the project (``projectId``) or in ``metadata.prompt``.
_PROMPT_SOURCE = {"anyOf": [
    {"required": ["projectId"], "properties": {"projectId": {"type": "string"}}},
    {"required": ["metadata"], "properties": {"metadata": {
        "type": "object", "required": ["prompt"],
        "properties": {"prompt": {"type": "string", "pattern": r"\S"}}}}},
]}


class _QueueJob(_Body):
    model_config = ConfigDict(json_schema_extra=_PROMPT_SOURCE)

    project_id: Uuid | None = Field(default=None, alias="projectId", description=(
        "A project of the caller's whose prompt the job uses"))

    def to_request(self) -> SubmitRequest:
        metadata = getattr(self, "metadata", None)
        return SubmitRequest(
            job_type=getattr(self, "job_type"),
            metadata=metadata.model_dump(exclude_unset=True) if metadata is not None else {},
            project_id=self.project_id, image_id=getattr(self, "image_id", None),
            video_id=getattr(self, "video_id", None))


class _ImageJob(_QueueJob):
    """What every image job takes besides its type and metadata."""

    image_id: Uuid | None = Field(default=None, alias="imageId", description=(
        "A pre-created image row of the caller's (POST /v1/images) to fill"))
    video_id: None = Field(default=None, alias="videoId", description="Only for video jobs")


class SdxlJobBody(_ImageJob):
    """An SDXL image job (up to six images)."""

    job_type: Literal[_SDXL_TYPES] = Field(alias="jobType")  # type: ignore[valid-type]
    metadata: SdxlMetadata | None = None


class WanImageJobBody(_ImageJob):
    """A WAN image job (one image)."""

    job_type: Literal[_WAN_IMAGE_TYPES] = Field(alias="jobType")  # type: ignore[valid-type]
    metadata: WanMetadata | None = None


class VideoJobBody(_QueueJob):
    """A WAN video job (one MP4)."""

    job_type: Literal[_VIDEO_TYPES] = Field(alias="jobType")  # type: ignore[valid-type]
    metadata: WanMetadata | None = None
    video_id: Uuid | None = Field(default=None, alias="videoId", description=(
        "A pre-created video row of the caller's (POST /v1/videos) to fill"))
    image_id: None = Field(default=None, alias="imageId", description="Only for image jobs")


class QueueJobBody(RootModel[Annotated[Union[SdxlJobBody, WanImageJobBody, VideoJobBody],
                                       Field(discriminator="job_type")]]):
    """CONTRACT §2: ``{jobType, metadata?, projectId?, videoId?, imageId?}``, camelCase as the
    legacy clients send it (snake_case accepted). The price is the job type's."""


def parse_job_request() -> SubmitRequest:
    """The body of queue-job / POST /v1/jobs as a submission; 400 naming the problem.

    An unknown job type is refused with the list of the ten (CONTRACT §1)."""
    data = parse_object()
    job_type = data.get("jobType", data.get("job_type"))
    if isinstance(job_type, str):
        resolve_job_type(job_type)  # raises the 400 that lists the valid types
    try:
        body = QueueJobBody.model_validate(data)
    except ValidationError as e:
        # Drop the tag pydantic puts first in the location of a discriminated union's errors.
        details = [{**d, "field": d["field"].split(".", 1)[1] if d["field"].startswith(
            tuple(f"{t}." for t in VALID_JOB_TYPES)) else d["field"]} for d in validation_details(e)]
        raise InvalidRequest(f"Invalid request: {details[0]['field'] if details else 'body'}",
                             details=details) from None
    return body.root.to_request()


class AdminMetadata(BaseModel):
    """Kept on the job; ``prompt``, ``num_images`` and ``mode`` here are overridden."""

    model_config = ConfigDict(extra="allow", strict=True)

    seed: Seed | None = None
    negative_prompt: Prompt | None = None


class AdminImageBody(_Body):
    """CONTRACT §6."""

    prompt: NonBlankPrompt
    mode: Literal["fast", "high"] | None = Field(default=None, description=(
        "fast: sdxl_image_fast (default), high: sdxl_image_high"))
    metadata: AdminMetadata | None = None


class ProjectBody(_Body):
    title: str | None = Field(default=None, max_length=200)
    original_prompt: Prompt | None = None
    enhanced_prompt: Prompt | None = None
    media_type: str | None = Field(default=None, max_length=16)


class AssetBody(_Body):
    title: str | None = Field(default=None, max_length=200)
    prompt: Prompt | None = None
    project_id: Uuid | None = None


def _ascii_digits(value: Any) -> Any:
    """Query strings are text: ``limit`` is ASCII digits only (no sign, space, ``_`` or ``.``)."""
    if isinstance(value, str) and not re.fullmatch(r"[0-9]{1,4}", value):
        raise ValueError("must be an integer")
    return value


def _event_id(value: Any) -> Any:
    if isinstance(value, str) and not re.fullmatch(r"[0-9]{1,17}", value):
        raise ValueError("must be a non-negative integer")
    return value


def _empty_is_none(value: Any) -> Any:
    return None if value == "" else value


class ListJobsQuery(BaseModel):
    """``GET /v1/jobs`` query string."""

    model_config = ConfigDict(extra="ignore")

    status: JobStatusName | None = Field(default=None, description="Only jobs in this status")
    job_type: JobTypeName | None = Field(default=None, description="Only jobs of this type")
    limit: Annotated[int, BeforeValidator(_ascii_digits)] = Field(
        default=20, ge=1, le=MAX_PAGE, description="Page size")
    cursor: Annotated[str | None, BeforeValidator(_empty_is_none)] = Field(
        default=None, max_length=200, description=(
            "`next_cursor` of the previous page (opaque); empty or absent: the first page"),
        json_schema_extra={"format": "job-cursor"})

    @classmethod
    def from_request(cls) -> "ListJobsQuery":
        return cls.model_validate(request.args.to_dict())


class EventsQuery(BaseModel):
    """Query string of the event streams."""

    model_config = ConfigDict(extra="ignore")

    since: Annotated[int, BeforeValidator(_event_id)] = Field(
        default=0, ge=0, le=10**17 - 1, description=(
            "Resume after this event id (as `Last-Event-ID`, which wins when both are given)"))

    @classmethod
    def from_request(cls) -> "EventsQuery":
        return cls.model_validate(request.args.to_dict())


LastEventId = Annotated[str, Field(pattern=r"^[0-9]{1,17}$", description=(
    "The id of the last event received: the stream resumes after it, nothing lost or repeated"))]


IdempotencyKey = Annotated[str, Field(
    min_length=1, max_length=MAX_KEY_CHARS, pattern=r"^[!-~]([ -~]*[!-~])?$", description=(
        "Makes the write safe to retry (per user, kept 24 h): the same key and body replay the "
        "first answer with `Idempotent-Replayed: true`; the same key with another body is a 422"))]


def parse(model: type[M]) -> M:
    """The JSON body as ``model``; 400 for anything that is not a JSON object of that shape."""
    return model.model_validate(parse_object())


def parse_object() -> dict[str, Any]:
    """The JSON body as a dict; 400 for invalid JSON or anything but an object."""
    raw = request.get_data(cache=True)
    try:
        data = json.loads(raw or b"null", parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise InvalidRequest("Request body must be valid JSON") from e
    if b"\\u0000" in raw.lower():
        raise InvalidRequest("Strings must not contain NUL characters")
    if not isinstance(data, dict):
        raise InvalidRequest("Request body must be a JSON object")
    if _depth(data) > MAX_JSON_DEPTH:
        raise InvalidRequest(f"Request body is nested deeper than {MAX_JSON_DEPTH} levels")
    for name in ("metadata",):
        if name in data and len(json.dumps(data[name])) > MAX_METADATA_BYTES:
            raise InvalidRequest(f"{name} is larger than {MAX_METADATA_BYTES} bytes",
                                 details={"field": name})
    return data


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, level)
            if level <= MAX_JSON_DEPTH:
                stack.extend((child, level + 1) for child in
                             (node.values() if isinstance(node, dict) else node))
    return deepest


def _reject_constant(name: str) -> None:
    """NaN and Infinity are not JSON (Python accepts them; PostgreSQL does not)."""
    raise ValueError(f"{name} is not valid JSON")


# --- answers ---------------------------------------------------------------------------------
# What the views return, field for field (orchestrator.records builds most of these);
# tests/test_openapi.py checks the record builders against them and schemathesis
# validates every answer it gets.

Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"},
                                 description="ISO 8601, UTC, with a Z")]
Url = Annotated[str, Field(description="Signed, expiring download link (no header needed)")]


class _Answer(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorBody(_Answer):
    """Every error: a message, a stable code, sometimes details. Never a stack trace."""

    success: Literal[False]
    error: str
    code: str = Field(description=(
        "invalid_request, unauthorized, insufficient_credits, forbidden, not_found, conflict, "
        "payload_too_large, unprocessable, rate_limited, unavailable, generation_failed, timeout, "
        "or the HTTP reason for routing errors (method_not_allowed, ...)"))
    details: Any = Field(default=None, description="Field paths, limits or ids; never the input")


class AssetLink(_Answer):
    bucket: JobTypeName
    path: str = Field(description="Relative to the bucket: `<user_id>/<file>`")
    url: Url


class JobRecord(_Answer):
    """The job as the API returns it (CONTRACT §2 ``job``)."""

    id: Uuid
    user_id: Uuid
    job_type: JobTypeName
    status: JobStatusName
    format: Literal["image", "video"]
    quality: Literal["fast", "high"]
    model_variant: str
    queue: Literal["sdxl", "wan"] = Field(description="The worker family")
    prompt: str
    negative_prompt: str | None
    enhanced_prompt: str | None
    metadata: dict[str, Any]
    project_id: Uuid | None
    image_id: Uuid | None
    video_id: Uuid | None
    progress: int = Field(ge=0, le=100)
    attempts: int = Field(ge=0)
    max_attempts: int = Field(ge=0)
    credits: int = Field(ge=0)
    error_message: str | None
    created_at: Timestamp
    dispatched_at: Timestamp | None
    started_at: Timestamp | None
    completed_at: Timestamp | None
    updated_at: Timestamp
    assets: list[AssetLink]
    thumbnail: AssetLink | None
    queue_position: int | None = Field(ge=1, description=(
        "1 = next to start in its family's queue; null unless queued"))
    eta_seconds: float | None = Field(ge=0, description=(
        "Estimated seconds until done (queued jobs; null while no worker of the family is seen)"))


class QueueJobDebug(_Answer):
    userId: Uuid
    hasPrompt: bool
    redisConfigured: bool
    timestamp: Timestamp


class QueueJobAnswer(_Answer):
    """CONTRACT §2's success body."""

    success: Literal[True]
    job: JobRecord
    message: str
    queueLength: int = Field(ge=0)
    modelVariant: str
    jobType: JobTypeName
    queue: Literal["sdxl_queue", "wan_queue"]
    family: Literal["sdxl", "wan"]
    isSDXL: bool
    negativePromptSupported: bool
    creditsCharged: int
    tokenBalance: int
    debug: QueueJobDebug


class SubmittedJob(_Answer):
    """A new run of a job: ``POST /v1/jobs`` (201) and retry (200)."""

    job: JobRecord
    queue_length: int = Field(ge=0)
    token_balance: int


class JobPage(_Answer):
    jobs: list[JobRecord] = Field(description="Newest first")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last")


class _AssetRow(_Answer):
    id: Uuid
    user_id: Uuid
    project_id: Uuid | None
    title: str | None
    prompt: str | None
    enhanced_prompt: str | None
    status: AssetStatusName
    thumbnail_url: str | None = Field(description="Path relative to the bucket")
    quality: str | None
    metadata: dict[str, Any]
    created_at: Timestamp
    updated_at: Timestamp
    completed_at: Timestamp | None


class ImageRow(_AssetRow):
    """An ``images`` row (CONTRACT §5)."""

    image_url: str | None = Field(description="First output, relative to the bucket")
    image_urls: list[str] | None = Field(description="All outputs when there are several")
    generation_mode: str | None


class VideoRow(_AssetRow):
    """A ``videos`` row (CONTRACT §5)."""

    video_url: str | None = Field(description="The MP4, relative to the bucket")
    duration: float | None
    resolution: str | None
    format: str | None


class DownloadUrls(_Answer):
    image_url: Url | None = None
    video_url: Url | None = None
    thumbnail_url: Url | None = None
    image_urls: list[Url] | None = None


class ImageRecord(ImageRow):
    """The image row with signed download links beside its paths."""

    bucket: JobTypeName | None
    download_urls: DownloadUrls


class VideoRecord(VideoRow):
    """The video row with signed download links beside its paths."""

    bucket: JobTypeName | None
    download_urls: DownloadUrls


class ProjectRecord(_Answer):
    id: Uuid
    user_id: Uuid
    title: str | None
    original_prompt: str | None
    enhanced_prompt: str | None
    media_type: str | None
    created_at: Timestamp


class MeAnswer(_Answer):
    user_id: Uuid
    token_balance: int
    roles: list[str]


class CallbackAnswer(_Answer):
    """The job after the report; an identical retry answers the same."""

    success: Literal[True]
    jobId: Uuid
    status: JobStatusName
    attempts: int
    error_message: str | None


class AdminImage(_Answer):
    id: Uuid | None = Field(description="The images row")
    job_id: Uuid
    url: Url
    thumbnail_url: Url
    prompt: str
    mode: Literal["fast", "high"]
    timestamp: Timestamp | None
    metadata: dict[str, Any]


class AdminImageAnswer(_Answer):
    """CONTRACT §6."""

    success: Literal[True]
    image: AdminImage


class HealthAnswer(_Answer):
    status: Literal["ok"]


class ReadyAnswer(_Answer):
    status: Literal["ready", "unavailable"]
    checks: dict[str, str] = Field(description="database, storage, broker: `ok` or `down (…)`")


class QueueItem(_Answer):
    """rpop: the leased job as the legacy JSON text (CONTRACT §3), or null."""

    result: str | None


class QueueCount(_Answer):
    """llen / lpush: jobs waiting in the list."""

    result: int = Field(ge=0)


class UploadAnswer(_Answer):
    Key: str = Field(description="`<bucket>/<user_id>/<file>`")


# --- path parameters and raw bodies of the worker and file routes ----------------------------

JobId = Annotated[Uuid, Field(description="A job id (another user's is a 404 like a missing one)")]
AssetId = Annotated[Uuid, Field(description="An image/video id (another user's is a 404)")]
ProjectId = Annotated[Uuid, Field(description="A project id (another user's is a 404)")]
ListName = Annotated[Literal["sdxl_queue", "wan_queue"], Field(description=(
    "A worker family's legacy list (CONTRACT §3); any other name is a 404"))]
Bucket = Annotated[JobTypeName, Field(description="Storage bucket = job type")]
#: ``<owner uuid>/<file>``, as validated by ``LocalStorage.validate_key`` (a narrower,
#: always-valid spelling: no ``.`` segments, no percent-encoding, no control characters).
StorageKey = Annotated[str, Field(
    max_length=1024,
    pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
            r"(/[A-Za-z0-9_-][A-Za-z0-9._-]{0,99})+$",
    description="`<user_id>/<file>` inside the bucket, the user being the job's owner",
    examples=["6f1c2b9e-4c1d-4b8a-9a51-2d6c0f3e7a10/6b0e8f52-1f1e-4f7e-b7a5-3e1c2d9f8a01_0.png"])]
LeasedJob = Annotated[Uuid, Field(description="The id of a job this service leased")]


class LeasedJobJson(BaseModel):
    """lpush body: the job JSON an rpop returned (only its ``id`` is read)."""

    model_config = ConfigDict(extra="allow")

    id: Uuid

WorkerId = Annotated[str, Field(description=(
    "A name for the worker; its first 64 characters are kept as the job's lease owner"))]
Upsert = Annotated[str, Field(max_length=16, description=(
    "`true` replaces an existing object (PUT always does); otherwise an existing object is a 409"))]
#: Raw file bytes, as OpenAPI 3.0 spells them.
BINARY: dict[str, Any] = {"type": "string", "format": "binary"}


class FileQuery(BaseModel):
    """The signature of a download link; anything that does not verify is a 404."""

    model_config = ConfigDict(extra="ignore")

    expires: str = Field(pattern=r"^[0-9]{1,12}$", description="Unix time the link expires")
    sig: str = Field(pattern=r"^[0-9a-fA-F]{64}$", description="HMAC-SHA256 of the link, hex")


#: lpush's JSON body: the leased job's JSON, its id, or a list whose first item is one of them.
LpushBody = LeasedJobJson | LeasedJob | conlist(LeasedJobJson | LeasedJob, min_length=1)


class FamilyQueue(_Answer):
    """One worker family's queue, as operators and the console see it."""

    family: Literal["sdxl", "wan"]
    depth: int = Field(ge=0, description="Jobs queued (waiting to start)")
    oldest_wait_seconds: float = Field(ge=0, description="How long the oldest queued job has waited")
    running: int = Field(ge=0, description="Jobs processing now")
    workers: int = Field(ge=0, description="Job slots of the workers seen in the last 30 s")
    completions_per_minute: float = Field(ge=0, description="Completed jobs, last 5 minutes")
    p50_run_seconds: float | None = Field(ge=0, description="Median run time, last 200 completions")
    p95_run_seconds: float | None = Field(ge=0, description="95th percentile run time, same sample")


class QueuesAnswer(_Answer):
    queues: list[FamilyQueue]
