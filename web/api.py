"""The REST API under ``/v1``: a user's jobs, assets, projects and balance."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, g, jsonify

from orchestrator import completion, queries, submission
from orchestrator.records import asset_record, image_row, video_row
from orchestrator.submission import Submitted
from web.auth import user_required
from web.limits import submission_limit
from web.functions import publish_committed, submit_and_publish
from web.idempotent import keyed_write
from web.openapi import Link, spec
from web.schemas import (AssetBody, AssetId, ImageRecord, ImageRow, JobId, JobPage, JobRecord,
                         ListJobsQuery, MeAnswer, ProjectBody, ProjectId, ProjectRecord,
                         QueueJobBody, SubmittedJob, VideoRecord, VideoRow, parse,
                         parse_job_request)
from web.services import services

bp = Blueprint("api", __name__, url_prefix="/v1")

_JOB_LINKS = {
    "GetJob": Link("api.get_job", {"job_id": "$response.body#/job/id"}),
    "CancelJob": Link("api.cancel_job", {"job_id": "$response.body#/job/id"}),
}


def _job(job: Any) -> dict[str, Any]:
    return services().job_answer(job)


def _created_answer(submitted: Submitted) -> tuple[int, dict[str, Any]]:
    # A new job is the last of its queue: its position is the queue's length.
    return 201, {"job": services().job_answer(submitted.job, submitted.queue_length),
                 "queue_length": submitted.queue_length,
                 "token_balance": submitted.balance}


@bp.post("/jobs")
@spec(summary="Submit a job (REST answer)", tags=["jobs"], auth="user", body=QueueJobBody,
      idempotent=True, responses={201: SubmittedJob}, errors=(402, 404, 409, 429, 503),
      links={201: _JOB_LINKS},
      description="The same submission as `queue-job`: charged at once, refunded if it fails.")
@user_required
@submission_limit
def create_job() -> Any:
    return submit_and_publish(g.user_id, parse_job_request(), _created_answer)


@bp.get("/jobs")
@spec(summary="The caller's jobs, newest first", tags=["jobs"], auth="user", query=ListJobsQuery,
      responses={200: JobPage}, errors=(503,))
@user_required
def list_jobs() -> Any:
    query = ListJobsQuery.from_request()
    jobs, cursor = queries.list_jobs(
        services().db, g.user_id, status=query.status, job_type=query.job_type,
        limit=query.limit, cursor=query.cursor)
    return jsonify({"jobs": services().job_answers(jobs), "next_cursor": cursor})


@bp.get("/jobs/<job_id>")
@spec(summary="A job", tags=["jobs"], auth="user", path={"job_id": JobId},
      responses={200: JobRecord}, errors=(404, 503))
@user_required
def get_job(job_id: str) -> Any:
    return jsonify(_job(queries.get_job(services().db, g.user_id, job_id)))


@bp.post("/jobs/<job_id>/cancel")
@spec(summary="Cancel a queued or running job (refunded once)", tags=["jobs"], auth="user",
      path={"job_id": JobId}, idempotent=True, responses={200: JobRecord},
      errors=(404, 409, 503), description="409 when the job has already ended.")
@user_required
def cancel_job(job_id: str) -> Any:
    return keyed_write(g.user_id, lambda: (
        200, _job(completion.cancel_job(services().db, g.user_id, job_id))))


@bp.post("/jobs/<job_id>/retry")
@spec(summary="Requeue a failed job as a new run", tags=["jobs"], auth="user",
      path={"job_id": JobId}, idempotent=True, responses={200: SubmittedJob},
      errors=(402, 404, 409, 429, 503),
      description="Charged again, refunded again if it fails; 409 unless the job failed.")
@user_required
@submission_limit
def retry_job(job_id: str) -> Any:
    """Requeue a failed job as a new run (charged again; refunded if it fails)."""

    def run() -> tuple[int, dict[str, Any]]:
        svc = services()
        submitted = submission.retry_job(svc.db, g.user_id, job_id,
                                         max_attempts=svc.settings.max_attempts,
                                         max_active=svc.settings.max_active_jobs)
        publish_committed(submitted.job)
        # Requeued now: last in its queue.
        return 200, {"job": svc.job_answer(submitted.job, submitted.queue_length),
                     "queue_length": submitted.queue_length,
                     "token_balance": submitted.balance}

    return keyed_write(g.user_id, run)


@bp.get("/images/<image_id>")
@spec(summary="An image row with download links", tags=["assets"], auth="user",
      path={"image_id": AssetId}, responses={200: ImageRecord}, errors=(404, 503))
@user_required
def get_image(image_id: str) -> Any:
    image = queries.get_image(services().db, g.user_id, image_id)
    row = image_row(image)
    return jsonify(asset_record(row, (image.metadata_ or {}).get("bucket"), services().url_for_asset))


@bp.get("/videos/<video_id>")
@spec(summary="A video row with download links", tags=["assets"], auth="user",
      path={"video_id": AssetId}, responses={200: VideoRecord}, errors=(404, 503))
@user_required
def get_video(video_id: str) -> Any:
    video = queries.get_video(services().db, g.user_id, video_id)
    row = video_row(video)
    return jsonify(asset_record(row, (video.metadata_ or {}).get("bucket"), services().url_for_asset))


@bp.post("/images")
@spec(summary="Pre-create an image row (pass its id as imageId)", tags=["assets"], auth="user",
      body=AssetBody, responses={201: ImageRow}, errors=(404, 503),
      links={201: {"GetImage": Link("api.get_image", {"image_id": "$response.body#/id"})}})
@user_required
def create_image() -> Any:
    return _create_asset("image")


@bp.post("/videos")
@spec(summary="Pre-create a video row (pass its id as videoId)", tags=["assets"], auth="user",
      body=AssetBody, responses={201: VideoRow}, errors=(404, 503),
      links={201: {"GetVideo": Link("api.get_video", {"video_id": "$response.body#/id"})}})
@user_required
def create_video() -> Any:
    return _create_asset("video")


def _create_asset(kind: str) -> Any:
    body = parse(AssetBody)  # project_id, when given, is a uuid (the model says so)
    asset = queries.create_asset(services().db, g.user_id, kind, title=body.title,
                                 prompt=body.prompt, project_id=queries.canonical_uuid(body.project_id))
    row = image_row(asset) if kind == "image" else video_row(asset)
    return jsonify(row), 201


@bp.post("/projects")
@spec(summary="Create a project (queue-job resolves its prompt)", tags=["projects"], auth="user",
      body=ProjectBody, responses={201: ProjectRecord}, errors=(503,),
      links={201: {"GetProject": Link("api.get_project", {"project_id": "$response.body#/id"})}})
@user_required
def create_project() -> Any:
    body = parse(ProjectBody)
    project = queries.create_project(services().db, g.user_id, **body.model_dump())
    return jsonify(_project(project)), 201


@bp.get("/projects/<project_id>")
@spec(summary="A project", tags=["projects"], auth="user", path={"project_id": ProjectId},
      responses={200: ProjectRecord}, errors=(404, 503))
@user_required
def get_project(project_id: str) -> Any:
    return jsonify(_project(queries.get_project(services().db, g.user_id, project_id)))


def _project(p: Any) -> dict[str, Any]:
    from orchestrator.records import iso

    return {"id": p.id, "user_id": p.user_id, "title": p.title, "original_prompt": p.original_prompt,
            "enhanced_prompt": p.enhanced_prompt, "media_type": p.media_type,
            "created_at": iso(p.created_at)}


@bp.get("/me")
@spec(summary="The caller's balance and roles", tags=["account"], auth="user",
      responses={200: MeAnswer}, errors=(503,))
@user_required
def me() -> Any:
    return jsonify(queries.me(services().db, g.user_id))
