"""The external workers' HTTP protocol (CONTRACT §3–§4): an Upstash-REST-style
queue (``rpop``/``llen``/``lpush`` on ``sdxl_queue``/``wan_queue``) under a
configurable base path, and the storage upload.

Everything here takes the worker token (bearer) or a signed request, never a
user token. Only families listed in ``EXTERNAL_FAMILIES`` are served; for the
others the lists look empty (Celery workers take those jobs).
"""
from __future__ import annotations

import json
import time
from typing import Any

from flask import Blueprint, Flask, current_app, g, jsonify, request

from orchestrator import completion, external, queries, queues
from orchestrator.errors import Conflict, Forbidden, InvalidRequest, NotFound, PayloadTooLarge
from orchestrator.jobtypes import JOB_TYPES, Family
from web import openapi
from web.auth import worker_required
from web.schemas import (BINARY, Bucket, LeasedJob, ListName, LpushBody, QueueCount, QueueItem,
                         StorageKey, UploadAnswer, Upsert, WorkerId)
from web.services import services

queue_bp = Blueprint("worker_queue", __name__)
storage_bp = Blueprint("worker_storage", __name__, url_prefix="/storage/v1/object")


def init_app(app: Flask) -> None:
    base = app.extensions["orchestrator"].settings.queue_base_path
    app.register_blueprint(queue_bp, url_prefix=base or None)
    app.register_blueprint(storage_bp)


@queue_bp.before_request
def _body_cap() -> None:
    """rpop and llen never read their body: refuse one over the app's cap anyway,
    as every other POST route does (413, not a silently ignored upload)."""
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    if limit is not None and request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"Request bodies are limited to {limit} bytes")


def _family(name: str) -> Family:
    family = external.family_of_list(name)
    if family is None:
        raise NotFound(f"Unknown list {name!r}; lists are sdxl_queue and wan_queue")
    return family


def _served(family: Family) -> bool:
    return family.value in services().settings.external_families


@queue_bp.route("/rpop/<name>", methods=["GET", "POST"])
@openapi.spec(summary="Lease the oldest waiting job of a list (CONTRACT §3)", tags=["workers"],
              auth="worker", path={"name": ListName}, headers={"X-Worker-Id": WorkerId},
              responses={200: QueueItem}, errors=(404, 413, 503), description=(
                  "`{\"result\": \"<job JSON>\"}` or `{\"result\": null}`; the job is leased, not "
                  "lost: it is offered again if the worker goes silent. Lists of families not "
                  "in EXTERNAL_FAMILIES are always empty."))
@worker_required
def rpop(name: str) -> Any:
    """Lease the oldest waiting job of the list's family: ``{"result": "<job JSON>"}`` or null."""
    family = _family(name)
    if not _served(family):
        return jsonify({"result": None})
    worker = f"external:{request.headers.get('X-Worker-Id', g.worker_auth)[:64]}@{request.remote_addr}"
    _seen(worker, family)
    job = external.claim_next(services().db, services().settings, family, worker=worker)
    return jsonify({"result": json.dumps(external.legacy_payload(job)) if job else None})


_last_beat: dict[str, float] = {}


def _seen(worker: str, family: str) -> None:
    """A polling external worker counts as a live worker (one write per 5 s at most)."""
    now = time.monotonic()
    if now - _last_beat.get(worker, float("-inf")) >= queues.WORKER_TTL.total_seconds() / 6:
        _last_beat[worker] = now
        queues.beat(services().db, worker, family)


@queue_bp.route("/llen/<name>", methods=["GET", "POST"])
@openapi.spec(summary="Jobs waiting in a list", tags=["workers"], auth="worker",
              path={"name": ListName}, responses={200: QueueCount}, errors=(404, 413, 503))
@worker_required
def llen(name: str) -> Any:
    family = _family(name)
    return jsonify({"result": external.waiting(services().db, family) if _served(family) else 0})


@queue_bp.route("/lpush/<name>", methods=["POST"])
@queue_bp.route("/lpush/<name>/<path:value>", methods=["GET", "POST"])
@openapi.spec(summary="Give a leased job back to its list", tags=["workers"], auth="worker",
              path={"name": ListName, "value": LeasedJob}, body_unless="value", body_content={
                  "application/json": LpushBody,
                  "text/plain": LeasedJob},
              responses={200: QueueCount}, errors=(400, 404, 409, 413, 503), description=(
                  "The value (path or body) is the job JSON an rpop returned, or its id. Jobs are "
                  "created only with queue-job: anything else is a 400; a job that is not leased "
                  "is a 409."))
@worker_required
def lpush(name: str, value: str | None = None) -> Any:
    """Give a leased job back to its queue (the value is the job JSON or its id).

    Jobs are created only through ``queue-job``: pushing anything else is a 400.
    """
    family = _family(name)
    raw = value if value is not None else request.get_data(as_text=True)
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = raw
    if isinstance(parsed, list) and parsed:
        parsed = parsed[0]
    job_id = queries.canonical_uuid(parsed.get("id") if isinstance(parsed, dict) else parsed)
    if job_id is None:
        raise InvalidRequest("lpush takes a job this service leased (its JSON or id); "
                             "submit new jobs with queue-job")
    if not completion.release(services().db, job_id):
        raise Conflict("That job is not leased; nothing was pushed")
    return jsonify({"result": external.waiting(services().db, family)})


@storage_bp.route("/<bucket>/<path:key>", methods=["POST", "PUT"], merge_slashes=False)
@openapi.spec(summary="Upload a file of a leased job (CONTRACT §4)", tags=["workers"],
              auth="worker", path={"bucket": Bucket, "key": StorageKey},
              headers={"x-upsert": Upsert}, body_content={
                  "application/octet-stream": BINARY, "image/png": BINARY, "video/mp4": BINARY,
                  "multipart/form-data": {"type": "object", "required": ["file"],
                                          "properties": {"file": BINARY}}},
              responses={200: UploadAnswer}, errors=(403, 409, 503), description=(
                  "Only into the bucket of a job leased to a worker, under its owner's folder, "
                  "up to the bucket's size cap (413). 403: no such job is leased; 409: the object "
                  "exists and `x-upsert` is not `true`."))
@worker_required
def upload(bucket: str, key: str) -> Any:
    """Store a file for a leased job: only into that job's bucket and owner folder,
    under the bucket's size cap. ``x-upsert: true`` replaces an existing object."""
    svc = services()
    spec = JOB_TYPES.get(bucket)
    if spec is None:
        raise InvalidRequest(f"Unknown bucket {bucket!r}", details={"field": "bucket"})
    owner = queries.canonical_uuid(key.split("/", 1)[0])
    if owner is None:
        raise InvalidRequest("The object key must start with the job owner's user id",
                             details={"field": "key"})
    key = svc.storage.validate_key(bucket, key, owner=owner)
    if not external.holds_lease(svc.db, bucket=bucket, owner=owner):
        raise Forbidden("No job of this bucket and user is leased to a worker")
    if request.content_length is not None and request.content_length > spec.bucket_cap:
        raise PayloadTooLarge(f"Objects in {bucket} are limited to {spec.bucket_cap} bytes")
    request.max_content_length = spec.bucket_cap + 64 * 1024  # multipart overhead
    upload_file = request.files.get("file") if request.mimetype == "multipart/form-data" else None
    data = upload_file.read(spec.bucket_cap + 1) if upload_file else request.get_data()
    if not data:
        raise InvalidRequest("Empty upload", details={"field": "file"})
    if len(data) > spec.bucket_cap:
        raise PayloadTooLarge(f"Objects in {bucket} are limited to {spec.bucket_cap} bytes")
    upsert = request.method == "PUT" or request.headers.get("x-upsert", "").lower() == "true"
    if not upsert and svc.storage.exists(bucket, key):
        raise Conflict("The object already exists (send x-upsert: true to replace it)")
    svc.storage.write(bucket, key, data, owner=owner)
    return jsonify({"Key": f"{bucket}/{key}"})
