"""CONTRACT §5: the worker callback, both dialects, both kinds of worker auth,
through the Flask test client against the real databases."""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Callable

import pytest
from sqlalchemy import select

from orchestrator.models import CreditEntry, Image, Job, Video
from orchestrator.webhooks import sign
from tests.helpers import assert_json_error, balance

CALLBACK = "/functions/v1/job-callback"
LONG_PROMPT = ("A very detailed portrait of an old sailor with a white beard, standing on a "
               "windswept pier at golden hour, oil painting")


# --- helpers --------------------------------------------------------------------------------


def queue(client: Any, headers: dict[str, str], job_type: str = "sdxl_image_fast",
          prompt: str = LONG_PROMPT, **extra: Any) -> dict[str, Any]:
    body = {"jobType": job_type, "metadata": {"prompt": prompt}, **extra}
    resp = client.post("/functions/v1/queue-job", json=body, headers=headers)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return resp.get_json()["job"]


def callback(client: Any, headers: dict[str, str], body: Any) -> Any:
    return client.post(CALLBACK, json=body, headers=headers)


def load_job(db: Any, job_id: str) -> Job:
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def load_image(db: Any, image_id: str) -> Image:
    with db.session() as s:
        return s.get(Image, image_id)


def load_video(db: Any, video_id: str) -> Video:
    with db.session() as s:
        return s.get(Video, video_id)




def refunds(db: Any, job_id: str) -> list[CreditEntry]:
    with db.session() as s:
        return list(s.execute(select(CreditEntry).where(
            CreditEntry.job_id == job_id, CreditEntry.reason == "job_refund")).scalars())


def snapshot(db: Any, job_id: str) -> tuple[Any, ...]:
    """Everything a callback could change, for "nothing changed" checks."""
    with db.session() as s:
        job = s.get(Job, job_id)
        asset = s.get(Video, job.video_id) if job.video_id else s.get(Image, job.image_id)
        ledger = s.execute(select(CreditEntry.id, CreditEntry.reason, CreditEntry.delta)
                           .where(CreditEntry.job_id == job_id).order_by(CreditEntry.id)).all()
        return (job.status, job.progress, job.attempts, job.started_at, job.completed_at,
                job.error_message, job.enhanced_prompt, job.result, job.metadata_, job.updated_at,
                asset.status, getattr(asset, "image_url", None), getattr(asset, "video_url", None),
                asset.title, asset.metadata_, asset.updated_at, tuple(ledger))




def signed_headers(secret: str, body: bytes, *, ts: int | None = None,
                   msg_id: str | None = None) -> dict[str, str]:
    ts = int(time.time()) if ts is None else ts
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts),
            "webhook-signature": sign(secret, msg_id, ts, body),
            "Content-Type": "application/json"}


# --- current dialect ------------------------------------------------------------------------


def test_current_dialect_processing_then_completed_sdxl(client: Any, db: Any,
                                                        worker_headers: dict[str, str],
                                                        make_user: Callable[..., Any]) -> None:
    user_id, headers = make_user()
    job = queue(client, headers)
    job_id, image_id = job["id"], job["image_id"]
    assert job["status"] == "queued" and image_id

    resp = callback(client, worker_headers, {"job_id": job_id, "status": "processing"})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.get_json()["status"] == "processing"
    row = load_job(db, job_id)
    assert row.status == "processing"
    assert row.started_at is not None
    assert load_image(db, image_id).status == "generating"

    paths = [f"{user_id}/{job_id}_{i}.png" for i in range(6)]
    resp = callback(client, worker_headers, {"job_id": job_id, "status": "completed", "assets": paths})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["success"] is True and body["status"] == "completed"

    row = load_job(db, job_id)
    assert row.status == "completed"
    assert row.progress == 100
    assert row.completed_at is not None and row.completed_at >= row.started_at
    assert row.error_message is None
    assert row.metadata_["primary_asset"] == paths[0]
    assert row.metadata_["all_assets"] == paths
    assert row.metadata_["prompt"] == LONG_PROMPT  # the submitted metadata is kept

    image = load_image(db, image_id)
    assert image.status == "completed"
    assert image.image_url == paths[0]
    assert image.image_urls == paths
    assert image.title == LONG_PROMPT[:60]
    assert len(image.title) == 60
    assert image.completed_at is not None

    # the API reports the same and a paid job stays paid
    api = client.get(f"/v1/jobs/{job_id}", headers=headers).get_json()
    assert api["status"] == "completed"
    assert [a["path"] for a in api["assets"]] == paths
    assert balance(client, headers) == 99
    assert refunds(db, job_id) == []


def test_single_asset_image_has_no_image_urls(client: Any, db: Any, worker_headers: dict[str, str],
                                              make_user: Callable[..., Any]) -> None:
    user_id, headers = make_user()
    job = queue(client, headers, job_type="image_fast", prompt="short prompt")
    path = f"{user_id}/one.png"
    resp = callback(client, worker_headers, {"job_id": job["id"], "status": "completed", "assets": [path]})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    image = load_image(db, job["image_id"])
    assert image.status == "completed"
    assert image.image_url == path
    assert image.image_urls is None
    assert image.title == "short prompt"
    row = load_job(db, job["id"])
    assert row.metadata_["primary_asset"] == path and row.metadata_["all_assets"] == [path]


def test_current_dialect_enhanced_prompt_is_stored(client: Any, db: Any, worker_headers: dict[str, str],
                                                   make_user: Callable[..., Any]) -> None:
    user_id, headers = make_user()
    job = queue(client, headers, job_type="image7b_fast_enhanced", prompt="a cat")
    resp = callback(client, worker_headers, {
        "job_id": job["id"], "status": "completed", "assets": [f"{user_id}/cat.png"],
        "enhanced_prompt": "a fluffy ginger cat, soft window light"})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert load_job(db, job["id"]).enhanced_prompt == "a fluffy ginger cat, soft window light"
    assert load_image(db, job["image_id"]).enhanced_prompt == "a fluffy ginger cat, soft window light"


# --- legacy dialect -------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["filePath", "outputUrl", "imageUrls"])
def test_legacy_dialect_video(client: Any, db: Any, worker_headers: dict[str, str],
                              make_user: Callable[..., Any], field: str) -> None:
    user_id, headers = make_user()
    job = queue(client, headers, job_type="video_fast", prompt="waves crashing on rocks")
    job_id, video_id = job["id"], job["video_id"]
    assert video_id and job["image_id"] is None

    resp = callback(client, worker_headers, {"jobId": job_id, "status": "processing"})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert load_job(db, job_id).status == "processing"
    assert load_video(db, video_id).status == "generating"

    path = f"{user_id}/{job_id}.mp4"
    ref: Any = {
        "filePath": path,
        "outputUrl": f"https://x.example/storage/v1/object/public/video_fast/{path}",
        "imageUrls": [path],
    }[field]
    resp = callback(client, worker_headers, {"jobId": job_id, "status": "completed", field: ref,
                                             "enhancedPrompt": "enhanced waves"})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.get_json()["status"] == "completed"

    row = load_job(db, job_id)
    assert row.status == "completed" and row.progress == 100
    assert row.enhanced_prompt == "enhanced waves"
    assert row.metadata_["primary_asset"] == path
    video = load_video(db, video_id)
    assert video.status == "completed"
    assert video.video_url == path
    assert video.completed_at is not None
    assert video.title == "waves crashing on rocks"


def test_legacy_dialect_failed_with_error_message(client: Any, db: Any, worker_headers: dict[str, str],
                                                  make_user: Callable[..., Any]) -> None:
    _, headers = make_user()
    job = queue(client, headers, job_type="video_high", prompt="a storm")
    assert balance(client, headers) == 95
    resp = callback(client, worker_headers, {"jobId": job["id"], "status": "failed",
                                             "errorMessage": "CUDA out of memory"})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    row = load_job(db, job["id"])
    assert row.status == "failed"
    assert row.error_message == "CUDA out of memory"
    assert load_video(db, job["video_id"]).status == "failed"
    assert balance(client, headers) == 100


# --- asset reference forms ------------------------------------------------------------------


@pytest.mark.parametrize("form", ["url object", "url string", "bucket-prefixed", "path object"])
def test_asset_forms_are_stored_bucket_relative(client: Any, db: Any, worker_headers: dict[str, str],
                                                make_user: Callable[..., Any], form: str) -> None:
    user_id, headers = make_user()
    job = queue(client, headers, job_type="sdxl_image_high")
    files = [f"{user_id}/a.png", f"{user_id}/b.png"]
    bucket = "sdxl_image_high"
    refs: list[Any] = {
        "url object": [{"url": f"https://x.example/storage/v1/object/public/{bucket}/{f}"} for f in files],
        "url string": [f"https://x.example/storage/v1/object/public/{bucket}/{f}" for f in files],
        "bucket-prefixed": [f"{bucket}/{f}" for f in files],
        "path object": [{"path": f} for f in files],
    }[form]
    resp = callback(client, worker_headers, {"job_id": job["id"], "status": "completed", "assets": refs})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    row = load_job(db, job["id"])
    assert row.status == "completed"
    assert row.metadata_["all_assets"] == files
    assert row.metadata_["primary_asset"] == files[0]
    image = load_image(db, job["image_id"])
    assert image.image_url == files[0]
    assert image.image_urls == files


# --- Standard Webhooks signatures -----------------------------------------------------------


def test_signed_callback_accepted(client: Any, db: Any, settings: Any,
                                  make_user: Callable[..., Any]) -> None:
    user_id, headers = make_user()
    job = queue(client, headers)
    path = f"{user_id}/signed.png"
    body = json.dumps({"job_id": job["id"], "status": "completed", "assets": [path]}).encode()
    resp = client.post(CALLBACK, data=body, headers=signed_headers(settings.worker_secrets[0], body))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    row = load_job(db, job["id"])
    assert row.status == "completed"
    assert row.metadata_["primary_asset"] == path


def _flip_one_byte(body: bytes) -> bytes:
    # Change one character of the status value: still valid JSON, different bytes.
    i = body.index(b"completed")
    return body[:i] + b"C" + body[i + 1:]


@pytest.mark.parametrize("attack", ["flipped body byte", "wrong secret", "stale timestamp",
                                    "future timestamp", "signature for other id", "missing signature"])
def test_bad_signature_refused_and_nothing_changes(client: Any, db: Any, settings: Any,
                                                   make_user: Callable[..., Any], attack: str) -> None:
    user_id, headers = make_user()
    job = queue(client, headers)
    before = snapshot(db, job["id"])
    body = json.dumps({"job_id": job["id"], "status": "completed",
                       "assets": [f"{user_id}/x.png"]}).encode()
    secret = settings.worker_secrets[0]
    now = int(time.time())
    sent = body
    if attack == "flipped body byte":
        hdrs = signed_headers(secret, body)
        sent = _flip_one_byte(body)
        assert sent != body and len(sent) == len(body)
    elif attack == "wrong secret":
        hdrs = signed_headers(secret + "-other", body)
    elif attack == "stale timestamp":
        hdrs = signed_headers(secret, body, ts=now - 360)
    elif attack == "future timestamp":
        hdrs = signed_headers(secret, body, ts=now + 360)
    elif attack == "signature for other id":
        hdrs = signed_headers(secret, body, msg_id="msg_a")
        hdrs["webhook-id"] = "msg_b"
    else:
        hdrs = signed_headers(secret, body)
        del hdrs["webhook-signature"]
    resp = client.post(CALLBACK, data=sent, headers=hdrs)
    body_json = assert_json_error(resp, 401)
    assert body_json["code"] == "unauthorized"
    assert snapshot(db, job["id"]) == before
    assert before[0] == "queued"


def test_replayed_webhook_id_answers_as_before_without_effect(client: Any, db: Any, settings: Any,
                                                              make_user: Callable[..., Any]) -> None:
    """A redelivery (same id and body, new timestamp and signature) replays the first
    answer and changes nothing, even where running it again would (it would fail the
    retried job); the same id with another body is 409, nothing changes."""
    user_id, headers = make_user()
    job = queue(client, headers)
    secret = settings.worker_secrets[0]
    failed = json.dumps({"job_id": job["id"], "status": "failed", "error_message": "gpu fell off"}).encode()
    first = client.post(CALLBACK, data=failed, headers=signed_headers(secret, failed, msg_id="msg_1"))
    assert first.status_code == 200, first.get_data(as_text=True)
    assert first.get_json()["status"] == "failed"
    retried = client.post(f"/v1/jobs/{job['id']}/retry", headers=headers)
    assert retried.status_code == 200, retried.get_data(as_text=True)
    before = snapshot(db, job["id"])
    assert before[0] == "queued"

    again = client.post(CALLBACK, data=failed,
                        headers=signed_headers(secret, failed, ts=int(time.time()) - 5, msg_id="msg_1"))
    assert again.status_code == 200
    assert again.get_data() == first.get_data()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert snapshot(db, job["id"]) == before

    other = json.dumps({"job_id": job["id"], "status": "completed",
                        "assets": [f"{user_id}/x.png"]}).encode()
    refused = client.post(CALLBACK, data=other, headers=signed_headers(secret, other, msg_id="msg_1"))
    assert assert_json_error(refused, 409)["code"] == "conflict"
    assert snapshot(db, job["id"]) == before
    # a new id with the same failure is a new delivery and does take effect
    fresh = client.post(CALLBACK, data=failed, headers=signed_headers(secret, failed, msg_id="msg_2"))
    assert fresh.status_code == 200 and fresh.get_json()["status"] == "failed"


def test_bad_signature_not_rescued_by_valid_bearer(client: Any, db: Any, settings: Any,
                                                   worker_headers: dict[str, str],
                                                   make_user: Callable[..., Any]) -> None:
    """Signature headers present → the signature decides; a bearer does not rescue it."""
    user_id, headers = make_user()
    job = queue(client, headers)
    before = snapshot(db, job["id"])
    body = json.dumps({"job_id": job["id"], "status": "completed",
                       "assets": [f"{user_id}/x.png"]}).encode()
    hdrs = {**signed_headers(settings.worker_secrets[0] + "-bad", body), **worker_headers}
    resp = client.post(CALLBACK, data=body, headers=hdrs)
    assert_json_error(resp, 401)
    assert snapshot(db, job["id"]) == before


# --- failures and refunds -------------------------------------------------------------------


def test_failed_refunds_exactly_once(client: Any, db: Any, worker_headers: dict[str, str],
                                     make_user: Callable[..., Any]) -> None:
    user_id, headers = make_user()
    job = queue(client, headers, job_type="sdxl_image_high")  # 2 credits
    assert balance(client, headers) == 98
    callback(client, worker_headers, {"job_id": job["id"], "status": "processing"})
    fail = {"job_id": job["id"], "status": "failed", "error_message": "generator crashed"}

    first = callback(client, worker_headers, fail)
    assert first.status_code == 200, first.get_data(as_text=True)
    assert first.get_json()["status"] == "failed"
    row = load_job(db, job["id"])
    assert row.status == "failed"
    assert row.error_message == "generator crashed"
    assert row.completed_at is not None
    image = load_image(db, job["image_id"])
    assert image.status == "failed"
    assert image.image_url is None
    assert balance(client, headers) == 100
    assert len(refunds(db, job["id"])) == 1

    after_first = snapshot(db, job["id"])
    second = callback(client, worker_headers, fail)
    assert second.status_code == 200, second.get_data(as_text=True)
    assert second.get_json()["status"] == "failed"
    assert second.get_json()["success"] == first.get_json()["success"]
    assert balance(client, headers) == 100
    entries = refunds(db, job["id"])
    assert len(entries) == 1
    assert entries[0].delta == 2 and entries[0].user_id == user_id
    assert snapshot(db, job["id"]) == after_first


def test_failed_from_queued_also_refunds(client: Any, db: Any, worker_headers: dict[str, str],
                                         make_user: Callable[..., Any]) -> None:
    _, headers = make_user()
    job = queue(client, headers)
    resp = callback(client, worker_headers, {"job_id": job["id"], "status": "failed",
                                             "error_message": "boom"})
    assert resp.status_code == 200
    assert load_job(db, job["id"]).status == "failed"
    assert balance(client, headers) == 100
    assert len(refunds(db, job["id"])) == 1


@pytest.mark.parametrize("empty", [{"assets": []}, {}, {"imageUrls": []}])
def test_completed_without_assets_is_a_failure(client: Any, db: Any, worker_headers: dict[str, str],
                                               make_user: Callable[..., Any], empty: dict[str, Any]) -> None:
    _, headers = make_user()
    job = queue(client, headers)
    assert balance(client, headers) == 99
    resp = callback(client, worker_headers, {"job_id": job["id"], "status": "completed", **empty})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.get_json()["status"] == "failed"
    row = load_job(db, job["id"])
    assert row.status == "failed"
    assert row.error_message
    assert "primary_asset" not in row.metadata_
    assert load_image(db, job["image_id"]).status == "failed"
    assert balance(client, headers) == 100
    assert len(refunds(db, job["id"])) == 1


# --- terminal jobs --------------------------------------------------------------------------


def test_completed_job_ignores_later_callbacks(client: Any, db: Any, worker_headers: dict[str, str],
                                               make_user: Callable[..., Any]) -> None:
    user_id, headers = make_user()
    job = queue(client, headers)
    done = {"job_id": job["id"], "status": "completed", "assets": [f"{user_id}/final.png"]}
    first = callback(client, worker_headers, done)
    assert first.status_code == 200
    settled = snapshot(db, job["id"])

    retry = callback(client, worker_headers, done)
    assert retry.status_code == 200
    assert retry.get_data() == first.get_data()  # an identical retry answers as the first did
    assert snapshot(db, job["id"]) == settled

    for later in (
        {"job_id": job["id"], "status": "failed", "error_message": "late failure"},
        {"job_id": job["id"], "status": "processing"},
        {"job_id": job["id"], "status": "completed", "assets": [f"{user_id}/other.png"]},
        {"jobId": job["id"], "status": "failed", "errorMessage": "legacy late failure"},
    ):
        resp = callback(client, worker_headers, later)
        assert resp.status_code == 200, resp.get_data(as_text=True)
        assert resp.get_json()["status"] == "completed"
        assert snapshot(db, job["id"]) == settled
    assert balance(client, headers) == 99
    assert refunds(db, job["id"]) == []
    assert load_image(db, job["image_id"]).image_url == f"{user_id}/final.png"


def test_failed_job_ignores_later_completion(client: Any, db: Any, worker_headers: dict[str, str],
                                             make_user: Callable[..., Any]) -> None:
    user_id, headers = make_user()
    job = queue(client, headers)
    callback(client, worker_headers, {"job_id": job["id"], "status": "failed", "error_message": "x"})
    settled = snapshot(db, job["id"])
    resp = callback(client, worker_headers, {"job_id": job["id"], "status": "completed",
                                             "assets": [f"{user_id}/late.png"]})
    assert resp.status_code == 200
    assert resp.get_json()["status"] == "failed"
    assert snapshot(db, job["id"]) == settled
    assert load_image(db, job["image_id"]).image_url is None
    assert balance(client, headers) == 100


def test_cancelled_job_ignores_later_completion(client: Any, db: Any, worker_headers: dict[str, str],
                                                make_user: Callable[..., Any]) -> None:
    user_id, headers = make_user()
    job = queue(client, headers)
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=headers).status_code == 200
    settled = snapshot(db, job["id"])
    resp = callback(client, worker_headers, {"job_id": job["id"], "status": "completed",
                                             "assets": [f"{user_id}/late.png"]})
    assert resp.status_code == 200
    assert resp.get_json()["status"] == "cancelled"
    assert snapshot(db, job["id"]) == settled
    assert balance(client, headers) == 100


# --- hostile paths and bad input ------------------------------------------------------------


HOSTILE = [
    "../x",
    "{user}/../other/x.png",
    "{user}/../../etc/passwd",
    "/abs/x",
    "/{user}/x.png",
    "{user}\\x.png",
    "{user}/%2e%2e/x.png",
    "{user}/%2E%2E/x.png",
    "{user}/%252e%252e/x.png",
    "{user}/x%00.png",
    "{user}/x\x00.png",
    "{user}/./x.png",
    "{user}//x.png",
    "{user}/.hidden.png",
    "{other}/x.png",
    "x.png",
    "{user}",
    "",
    "https://x.example/storage/v1/object/public/video_fast/{user}/x.png",
    "https://x.example/storage/v1/object/public/sdxl_image_fast/{other}/x.png",
    "https://x.example/storage/v1/object/public/sdxl_image_fast/{user}/../{other}/x.png",
    "https://x.example/storage/v1/object/public/sdxl_image_fast/{user}/%2e%2e/x.png",
    "video_fast/{user}/x.png",
    "sdxl_image_fast/{other}/x.png",
]


@pytest.mark.parametrize("template", HOSTILE)
def test_hostile_asset_paths_rejected(client: Any, db: Any, worker_headers: dict[str, str],
                                      make_user: Callable[..., Any], template: str) -> None:
    user_id, headers = make_user()
    other = str(uuid.uuid4())
    job = queue(client, headers)
    before = snapshot(db, job["id"])
    ref = template.format(user=user_id, other=other)
    resp = callback(client, worker_headers, {"job_id": job["id"], "status": "completed",
                                             "assets": [f"{user_id}/ok.png", ref]})
    body = assert_json_error(resp, 400)
    assert body["code"] == "invalid_request"
    assert snapshot(db, job["id"]) == before
    assert balance(client, headers) == 99


@pytest.mark.parametrize("bad", [123, None, ["a"], {"url": 5}, {}])
def test_non_string_assets_rejected(client: Any, db: Any, worker_headers: dict[str, str],
                                    make_user: Callable[..., Any], bad: Any) -> None:
    _, headers = make_user()
    job = queue(client, headers)
    before = snapshot(db, job["id"])
    resp = callback(client, worker_headers, {"job_id": job["id"], "status": "completed", "assets": [bad]})
    assert_json_error(resp, 400)
    assert snapshot(db, job["id"]) == before


def test_hostile_path_in_legacy_dialect_rejected(client: Any, db: Any, worker_headers: dict[str, str],
                                                 make_user: Callable[..., Any]) -> None:
    user_id, headers = make_user()
    job = queue(client, headers, job_type="video_fast")
    before = snapshot(db, job["id"])
    resp = callback(client, worker_headers, {"jobId": job["id"], "status": "completed",
                                             "filePath": f"{user_id}/../../secret.mp4"})
    assert_json_error(resp, 400)
    assert snapshot(db, job["id"]) == before


def test_unknown_job_is_404(client: Any, worker_headers: dict[str, str]) -> None:
    resp = callback(client, worker_headers, {"job_id": str(uuid.uuid4()), "status": "completed",
                                             "assets": [f"{uuid.uuid4()}/x.png"]})
    body = assert_json_error(resp, 404)
    assert body["code"] == "not_found"
    resp = callback(client, worker_headers, {"jobId": str(uuid.uuid4()), "status": "processing"})
    assert_json_error(resp, 404)


@pytest.mark.parametrize("payload", [
    {"job_id": "not-a-uuid", "status": "completed"},
    {"job_id": "", "status": "completed"},
    {"job_id": 42, "status": "completed"},
    {"status": "completed"},
    {"job_id": "{job}", "status": "done"},
    {"job_id": "{job}", "status": "COMPLETED"},
    {"job_id": "{job}", "status": "queued"},
    {"job_id": "{job}", "status": "cancelled"},
    {"job_id": "{job}"},
    {"job_id": "{job}", "status": 1},
    {"job_id": "{job}", "status": "completed", "assets": "{user}/x.png"},
    {"job_id": "{job}", "status": "failed", "error_message": 17},
    {"job_id": "{job}", "status": "completed", "assets": ["{user}/x.png"], "metadata": [1]},
])
def test_malformed_callback_is_400(client: Any, db: Any, worker_headers: dict[str, str],
                                   make_user: Callable[..., Any], payload: dict[str, Any]) -> None:
    user_id, headers = make_user()
    job = queue(client, headers)
    before = snapshot(db, job["id"])
    body = json.loads(json.dumps(payload).replace("{job}", job["id"]).replace("{user}", user_id))
    resp = callback(client, worker_headers, body)
    assert_json_error(resp, 400)
    assert snapshot(db, job["id"]) == before


@pytest.mark.parametrize("raw", [b"not json", b"{\"job_id\": ", b"[]", b"\"completed\"", b"null", b""])
def test_non_json_or_non_object_body_is_400(client: Any, worker_headers: dict[str, str], raw: bytes) -> None:
    resp = client.post(CALLBACK, data=raw, headers={**worker_headers, "Content-Type": "application/json"})
    assert_json_error(resp, 400)
    resp = client.post(CALLBACK, data=raw, headers={**worker_headers, "Content-Type": "text/plain"})
    assert_json_error(resp, 400)
