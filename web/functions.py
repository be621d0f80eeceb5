"""The legacy edge-function routes (CONTRACT §2, §5, §6), same paths and shapes."""
from __future__ import annotations

import datetime as dt
import logging
import time
from typing import Any

from flask import Blueprint, g, jsonify

from orchestrator import callbacks, completion, external, faults, idempotency, queries
from orchestrator.callbacks import CallbackBody, parse_callback
from orchestrator.records import iso
from orchestrator.status import JobStatus
from orchestrator.submission import Answer, DuplicateKey, SubmitRequest, Submitted, submit_job
from web import idempotent
from web.auth import admin_required, user_required, worker_required
from web.limits import submission_limit
from web.openapi import Link, Reply, spec
from web.schemas import (AdminImageAnswer, AdminImageBody, CallbackAnswer, ErrorBody,
                         QueueJobAnswer, QueueJobBody, parse, parse_job_request, parse_object)
from web.services import services

log = logging.getLogger(__name__)

bp = Blueprint("functions", __name__, url_prefix="/functions/v1")

ADMIN_MODES = {"fast": "sdxl_image_fast", "high": "sdxl_image_high"}
ADMIN_POLL_S = 0.2


def publish_committed(job: Any, metadata: dict[str, Any] | None = None) -> None:
    """Publish a committed job. Once committed the job is accepted: if the
    broker refuses the message, the job stays queued without ``dispatched_at``
    and the reconciler publishes it when the broker is back."""
    svc = services()
    if job.family in svc.settings.external_families:
        return  # external workers take it from the database (rpop)
    faults.before_publish(svc.settings, metadata)
    try:
        svc.publish(job.id, job.job_type)
    except Exception as e:  # noqa: BLE001 - any broker failure leaves the job to the reconciler
        log.warning("publish of job %s failed (%s); the reconciler will publish it",
                    job.id, type(e).__name__)
        return
    svc.dispatch_marks.add(job.id)  # in a batch, off the request path


def submit_and_publish(user_id: str, req: SubmitRequest, answer: Answer) -> Any:
    """Commit the job, publish it, answer: the one path of every job submission.

    With an ``Idempotency-Key`` the answer is stored with the job (one
    transaction) and replayed for the same key and body.
    """
    svc = services()
    key = idempotent.request_key(user_id)
    if key is not None and (stored := idempotency.lookup(svc.db, key)) is not None:
        return idempotent.replay(stored)
    try:
        submitted = submit_job(svc.db, user_id, req, max_attempts=svc.settings.max_attempts,
                               max_active=svc.settings.max_active_jobs, key=key, answer=answer,
                               queue_length_max_age=svc.settings.queue_length_max_age)
    except DuplicateKey:
        return idempotent.replay_after_race(key)
    g.job_id = submitted.job.id  # on this request's log lines
    publish_committed(submitted.job, req.metadata)
    if submitted.answer is not None:
        return jsonify(submitted.answer.body), submitted.answer.status
    status, body = answer(submitted)
    return jsonify(body), status


def queue_job_answer(submitted: Submitted) -> tuple[int, dict[str, Any]]:
    """CONTRACT §2's success body."""
    spec, svc = submitted.spec, services()
    return 200, {
        "success": True,
        "job": svc.job_answer(submitted.job, submitted.queue_length),
        "message": f"{spec.name} job queued",
        "queueLength": submitted.queue_length,
        "modelVariant": spec.model_variant,
        "jobType": spec.name,
        "queue": spec.family.legacy_list,
        "family": spec.family.value,
        "isSDXL": spec.is_sdxl,
        "negativePromptSupported": spec.is_sdxl,
        "creditsCharged": spec.credits,
        "tokenBalance": submitted.balance,
        "debug": {
            "userId": submitted.job.user_id,
            "hasPrompt": True,
            "redisConfigured": bool(svc.settings.redis_url
                                    or svc.settings.broker_url.startswith("redis")),
            "timestamp": iso(dt.datetime.now(dt.timezone.utc)),
        },
    }


@bp.post("/queue-job")
@spec(summary="Submit a job (CONTRACT §2)", tags=["legacy functions"], auth="user",
      body=QueueJobBody, idempotent=True, responses={200: QueueJobAnswer},
      errors=(402, 404, 409, 429, 503),
      links={200: {"GetJob": Link("api.get_job", {"job_id": "$response.body#/job/id"})}},
      description=(
          "Validates the job, resolves its prompt (the project's enhanced, then original prompt, "
          "then `metadata.prompt`), charges the job type's credits and queues it. 404: the "
          "project or pre-created image/video is not the caller's; 409: that image/video is "
          "already being generated."))
@user_required
@submission_limit
def queue_job() -> Any:
    return submit_and_publish(g.user_id, parse_job_request(), queue_job_answer)


@bp.post("/job-callback")
@spec(summary="A worker reports progress or the result (CONTRACT §5)", tags=["workers"],
      auth="worker", body=CallbackBody, errors=(404, 409, 503), responses={
          200: Reply(CallbackAnswer, headers=("Idempotent-Replayed",))}, description=(
          "Both dialects: current `{job_id, status, assets, error_message, ...}` and legacy "
          "`{jobId, status, filePath?, outputUrl?, imageUrls?, errorMessage?, ...}`. Asset "
          "references must lie in the job's bucket under its owner's folder. A callback for a "
          "job that already ended changes nothing and answers its state. Signed deliveries "
          "(`webhook-id`, `webhook-timestamp`, `webhook-signature`: the webhookSignature "
          "scheme) are answered once per `webhook-id`; a redelivery replays the answer. 409: "
          "an external worker's lease expired, or a `webhook-id` came with another body."))
@worker_required
def job_callback() -> Any:
    return idempotent.once_per_webhook_id(g.get("webhook_id"), _apply_callback)


def _apply_callback() -> tuple[int, dict[str, Any]]:
    svc = services()
    # The job is read first only when the report needs it (files to check, external families
    # to route); otherwise the write finds it (and a missing one).
    report = parse_callback(svc.storage, svc.db, parse_object(),
                            facts=bool(svc.settings.external_families))
    g.job_id = report.job_id  # on this request's log lines
    if report.family in svc.settings.external_families:
        result = external.apply_callback(svc.db, svc.settings, report)
    elif report.status is JobStatus.PROCESSING:
        result = completion.report_processing(svc.db, report.job_id, worker=f"callback:{g.worker_auth}",
                                              lease_seconds=report.lease_seconds,
                                              claim_first=callbacks.likely_claim(svc.db, report))
        callbacks.reported(svc.db, report.job_id)
    else:
        result = completion.finish_job(svc.db, report.job_id, report.outcome)
    job = result.job
    # For orchestrator_callbacks_total: a renewed lease applies too; a late report changes nothing.
    g.callback_outcome = "applied" if result.changed or (
        report.status is JobStatus.PROCESSING and job.status == JobStatus.PROCESSING.value
    ) else "ignored"
    # No timestamps or signed URLs: an identical retry answers exactly as the first did.
    return 200, {"success": True, "jobId": job.id, "status": job.status,
                 "attempts": job.attempts, "error_message": job.error_message}


@bp.post("/generate-admin-image")
@spec(summary="Generate one image now, admins only (CONTRACT §6)", tags=["legacy functions"],
      auth="admin", body=AdminImageBody, errors=(402, 429, 503), responses={
          200: AdminImageAnswer,
          502: Reply(ErrorBody, "The generation failed (`code` generation_failed)"),
          504: Reply(ErrorBody, "Not finished within ADMIN_IMAGE_TIMEOUT (`code` timeout); "
                                "the job continues")})
@admin_required
@submission_limit
def generate_admin_image() -> Any:
    body = parse(AdminImageBody)
    svc = services()
    mode = body.mode or "fast"
    job_type = ADMIN_MODES[mode]
    extra = body.metadata.model_dump(exclude_unset=True) if body.metadata is not None else {}
    metadata = {**extra, "prompt": body.prompt, "num_images": 1, "admin": True, "mode": mode}
    submitted = submit_job(svc.db, g.user_id, SubmitRequest(job_type=job_type, metadata=metadata),
                           max_attempts=svc.settings.max_attempts,
                           max_active=svc.settings.max_active_jobs)
    publish_committed(submitted.job, metadata)
    job = _wait_for_end(submitted.job.id, svc.settings.admin_image_timeout)
    if job.status == JobStatus.COMPLETED.value:
        bucket, path = job.job_type, job.result["assets"][0]
        url = svc.url_for_asset(bucket, path)
        return jsonify({"success": True, "image": {
            "id": job.image_id, "job_id": job.id, "url": url, "thumbnail_url": url,
            "prompt": body.prompt, "mode": mode, "timestamp": iso(job.completed_at),
            "metadata": {**extra, "job_type": job_type, "seed": job.seed,
                         "path": path, "bucket": bucket}}})
    if JobStatus(job.status).is_terminal:
        return jsonify({"success": False, "error": f"Generation {job.status}: {job.error_message}",
                        "code": "generation_failed", "details": {"job_id": job.id}}), 502
    return jsonify({"success": False, "error": "Generation did not finish in time; it continues",
                    "code": "timeout", "details": {"job_id": job.id}}), 504


def _wait_for_end(job_id: str, timeout: float) -> Any:
    """Poll the job row (never a Celery result) until it ends or time runs out."""
    svc = services()
    deadline = time.monotonic() + timeout
    while True:
        job = queries.get_job(svc.db, g.user_id, job_id)
        if JobStatus(job.status).is_terminal or time.monotonic() >= deadline:
            return job
        time.sleep(ADMIN_POLL_S)
