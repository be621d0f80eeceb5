"""The REST API under ``/v1``: a user's jobs, assets, projects and balance."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, g, jsonify, request

from orchestrator import completion, queries, submission
from orchestrator.errors import InvalidRequest
from orchestrator.records import asset_record, image_row, job_record, video_row
from orchestrator.submission import SubmitRequest, Submitted
from web.auth import user_required
from web.functions import publish_committed, submit_and_publish
from web.idempotent import keyed_write
from web.schemas import AssetBody, ProjectBody, QueueJobBody, parse
from web.services import services

bp = Blueprint("api", __name__, url_prefix="/v1")


def _job(job: Any) -> dict[str, Any]:
    return job_record(job, services().url_for_asset)


def _created_answer(submitted: Submitted) -> tuple[int, dict[str, Any]]:
    return 201, {"job": _job(submitted.job), "queue_length": submitted.queue_length,
                 "token_balance": submitted.balance}


@bp.post("/jobs")
@user_required
def create_job() -> Any:
    body = parse(QueueJobBody)
    return submit_and_publish(g.user_id, SubmitRequest(
        job_type=body.job_type, metadata=body.metadata or {}, project_id=body.project_id,
        image_id=body.image_id, video_id=body.video_id), _created_answer)


@bp.get("/jobs")
@user_required
def list_jobs() -> Any:
    raw_limit = request.args.get("limit", "20")
    if not (raw_limit.isascii() and raw_limit.isdigit() and len(raw_limit) <= 4):
        raise InvalidRequest("limit must be an integer", details={"field": "limit"})
    jobs, cursor = queries.list_jobs(
        services().db, g.user_id, status=request.args.get("status") or None,
        job_type=request.args.get("job_type") or None, limit=int(raw_limit),
        cursor=request.args.get("cursor") or None)
    return jsonify({"jobs": [_job(j) for j in jobs], "next_cursor": cursor})


@bp.get("/jobs/<job_id>")
@user_required
def get_job(job_id: str) -> Any:
    return jsonify(_job(queries.get_job(services().db, g.user_id, job_id)))


@bp.post("/jobs/<job_id>/cancel")
@user_required
def cancel_job(job_id: str) -> Any:
    return keyed_write(g.user_id, lambda: (
        200, _job(completion.cancel_job(services().db, g.user_id, job_id))))


@bp.post("/jobs/<job_id>/retry")
@user_required
def retry_job(job_id: str) -> Any:
    """Requeue a failed job as a new run (charged again; refunded if it fails)."""

    def run() -> tuple[int, dict[str, Any]]:
        svc = services()
        submitted = submission.retry_job(svc.db, g.user_id, job_id,
                                         max_attempts=svc.settings.max_attempts)
        publish_committed(submitted.job)
        return 200, {"job": _job(submitted.job), "queue_length": submitted.queue_length,
                     "token_balance": submitted.balance}

    return keyed_write(g.user_id, run)


@bp.get("/images/<image_id>")
@user_required
def get_image(image_id: str) -> Any:
    image = queries.get_image(services().db, g.user_id, image_id)
    row = image_row(image)
    return jsonify(asset_record(row, (image.metadata_ or {}).get("bucket"), services().url_for_asset))


@bp.get("/videos/<video_id>")
@user_required
def get_video(video_id: str) -> Any:
    video = queries.get_video(services().db, g.user_id, video_id)
    row = video_row(video)
    return jsonify(asset_record(row, (video.metadata_ or {}).get("bucket"), services().url_for_asset))


@bp.post("/images")
@user_required
def create_image() -> Any:
    return _create_asset("image")


@bp.post("/videos")
@user_required
def create_video() -> Any:
    return _create_asset("video")


def _create_asset(kind: str) -> Any:
    body = parse(AssetBody)
    project_id = queries.canonical_uuid(body.project_id)
    if body.project_id is not None and project_id is None:
        raise InvalidRequest("project_id must be a uuid", details={"field": "project_id"})
    asset = queries.create_asset(services().db, g.user_id, kind, title=body.title,
                                 prompt=body.prompt, project_id=project_id)
    row = image_row(asset) if kind == "image" else video_row(asset)
    return jsonify(row), 201


@bp.post("/projects")
@user_required
def create_project() -> Any:
    body = parse(ProjectBody)
    project = queries.create_project(services().db, g.user_id, **body.model_dump())
    return jsonify(_project(project)), 201


@bp.get("/projects/<project_id>")
@user_required
def get_project(project_id: str) -> Any:
    return jsonify(_project(queries.get_project(services().db, g.user_id, project_id)))


def _project(p: Any) -> dict[str, Any]:
    from orchestrator.records import iso

    return {"id": p.id, "user_id": p.user_id, "title": p.title, "original_prompt": p.original_prompt,
            "enhanced_prompt": p.enhanced_prompt, "media_type": p.media_type,
            "created_at": iso(p.created_at)}


@bp.get("/me")
@user_required
def me() -> Any:
    return jsonify(queries.me(services().db, g.user_id))
